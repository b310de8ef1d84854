"""Made tests/data/state-main-<commit>.sqlite: a state DB as befund main at that commit wrote
it (before versioned migrations), for tests/test_state_schema.py. Run as

    git show ab3f855:service/state_db.py > /tmp/old_state_db.py
    python tests/data/make_legacy_state_db.py /tmp/old_state_db.py tests/data/state-main-ab3f855.sqlite

(and the same with 5027b3e, whose state DB also holds the web side's accounts and audit log).
"""

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

spec = importlib.util.spec_from_file_location("old_state_db", sys.argv[1])
old = importlib.util.module_from_spec(spec)
spec.loader.exec_module(old)
out = Path(sys.argv[2])
out.unlink(missing_ok=True)
db = old.StateDB(out)
t = 1767225600.0  # 2026-01-01


def inst(series, sop, n, assoc, study="1.2.826.0.1.1"):
    return SimpleNamespace(
        path=Path(f"/var/befund/spool/{study}/{series}/{sop}.dcm"), size=1000 + n,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2", sop_instance_uid=sop, series_uid=series,
        study_uid=study, transfer_syntax="1.2.840.10008.1.2.1", modality="CT", body_part="HEAD",
        descriptions=("CT Kopf", "axial"), image_type=("ORIGINAL", "PRIMARY"), instance_number=n,
        number_of_frames=None, patient_name="OLD^DB", patient_id="P-OLD", accession="ACC-OLD",
        study_date="20260101", calling_ae="CT1", peer_address="10.0.0.5", association_id=assoc,
        received_at=t + n, version=1)


for n in range(1, 4):
    db.record_instance(inst("1.2.826.0.1.1.1", f"1.2.826.0.1.1.1.{n}", n, "assoc-a"))
db.record_association_end("assoc-a", t + 10)
series = db.query_one("SELECT * FROM series WHERE series_uid='1.2.826.0.1.1.1'")
db.mark_series("1.2.826.0.1.1.1", "routed", completed_by="association", at=t + 12)
job = db.create_job_if_new(series, "ich_ct", "0.1.0", 0, t + 12)
db.finish_job(job, "done", {"analysed": True, "present": True, "certainty": 0.93}, "",
              [("dicom", "pacs", {"files": ["/var/befund/results/job-1/sr.dcm"]})])
db.mark_delivered(db.query_one("SELECT id FROM outbox")["id"])
for n in range(1, 3):
    db.record_instance(inst("1.2.826.0.1.1.2", f"1.2.826.0.1.1.2.{n}", n, "assoc-b"))
db.record_instance(inst("1.2.826.0.2.1.1", "1.2.826.0.2.1.1.1", 1, "assoc-c", study="1.2.826.0.2"))
series = db.query_one("SELECT * FROM series WHERE series_uid='1.2.826.0.2.1.1'")
db.mark_series("1.2.826.0.2.1.1", "routed", completed_by="api", at=t + 20)
job2 = db.create_job_if_new(series, "ich_ct", "0.1.0", 0, t + 20)
db.lease_job("old-node:1", 120)
if hasattr(old, "WEB_SCHEMA"):
    db._db.execute("""INSERT INTO users(name, role, password_hash, created_at)
                      VALUES ('anna', 'radiologist', '$argon2id$not-a-real-hash', ?)""", (t + 30,))
    db._db.execute("""INSERT INTO audit_log(at, user, role, action, study_uid)
                      VALUES (?, 'anna', 'radiologist', 'view_study', '1.2.826.0.1.1')""", (t + 31,))
    db._db.execute("""INSERT INTO flag_reviews(study_uid, action, model, model_version, run, user, at)
                      VALUES ('1.2.826.0.1.1', 'acknowledged', 'ich_ct', '0.1.0', 1, 'anna', ?)""",
                   (t + 32,))
db.close()

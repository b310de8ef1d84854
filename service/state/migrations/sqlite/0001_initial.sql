-- The schema of befund before versioned migrations (main at ab3f855). A state DB made by an
-- older befund is adopted as this version (service/state/schema.py brings its columns up first).
CREATE TABLE studies (
    study_uid TEXT PRIMARY KEY,
    patient_name TEXT, patient_id TEXT, accession TEXT, study_date TEXT,
    first_received_at REAL, updated_at REAL
);
CREATE TABLE series (
    series_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    modality TEXT, body_part TEXT, sop_class_uid TEXT,
    descriptions TEXT, image_type TEXT,
    instance_count INTEGER NOT NULL DEFAULT 0,
    bytes INTEGER NOT NULL DEFAULT 0,
    expected_count INTEGER,
    first_received_at REAL, last_received_at REAL,
    association_ended_at REAL,
    ready_requested INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL DEFAULT 'receiving',
    reason TEXT NOT NULL DEFAULT '',
    completed_at REAL,
    completed_by TEXT,
    restored INTEGER NOT NULL DEFAULT 0,
    revision INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX series_state ON series(state);
CREATE INDEX series_study ON series(study_uid);
CREATE TABLE instances (
    sop_instance_uid TEXT PRIMARY KEY,
    series_uid TEXT NOT NULL, study_uid TEXT NOT NULL,
    sop_class_uid TEXT, transfer_syntax TEXT, path TEXT NOT NULL, size INTEGER,
    instance_number INTEGER, number_of_frames INTEGER,
    calling_ae TEXT, peer_address TEXT, association_id TEXT, received_at REAL,
    purged_at REAL,
    version INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX instances_series ON instances(series_uid);
CREATE INDEX instances_assoc ON instances(association_id);
CREATE TABLE jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    series_uid TEXT NOT NULL, study_uid TEXT NOT NULL,
    model_name TEXT NOT NULL, model_version TEXT NOT NULL, run INTEGER NOT NULL,
    instance_count INTEGER NOT NULL,
    priority INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL DEFAULT 'queued',
    attempts INTEGER NOT NULL DEFAULT 0,
    lease_until REAL, lease_owner TEXT, next_attempt_at REAL NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    result TEXT,
    series_completed_at REAL,
    series_revision INTEGER,
    created_at REAL NOT NULL, updated_at REAL NOT NULL, finished_at REAL,
    stage TEXT NOT NULL DEFAULT '',
    analysis TEXT,
    UNIQUE (series_uid, model_name, model_version, run)
);
CREATE INDEX jobs_state ON jobs(state);
CREATE TABLE outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id INTEGER NOT NULL REFERENCES jobs(id),
    kind TEXT NOT NULL,
    destination TEXT NOT NULL,
    payload TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL, delivered_at REAL,
    UNIQUE (job_id, kind, destination)
);
CREATE INDEX outbox_state ON outbox(state, next_attempt_at);

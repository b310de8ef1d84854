-- A model's mode (pipelines/model_lineup.py) is kept with each job, as routing found it: a
-- shadow job's result is never delivered nor shown to readers, also after its model goes active.
-- The verdict and score beside the result's JSON: the shadow report (service/shadow_report.py)
-- compares thousands of jobs without decoding their per-slice and per-tile scores. Earlier rows
-- are filled by pattern, not by a jsonb cast: Python's json writes NaN, which jsonb refuses, and
-- a result's own "present" and "score" come first and in this order (AnalysisResult's fields).
ALTER TABLE jobs ADD COLUMN mode TEXT NOT NULL DEFAULT 'active';
ALTER TABLE jobs ADD COLUMN present INTEGER;
ALTER TABLE jobs ADD COLUMN score DOUBLE PRECISION;
UPDATE jobs SET present=CASE substring(result from '"analysed": (?:true|false), "present": (true|false)')
                            WHEN 'true' THEN 1 WHEN 'false' THEN 0 END,
                score=CAST(substring(result from '"present": (?:true|false|null), "score": (-?[0-9][0-9.eE+-]*)')
                           AS DOUBLE PRECISION)
    WHERE result IS NOT NULL;
CREATE INDEX jobs_model_finished ON jobs(model_name, finished_at);

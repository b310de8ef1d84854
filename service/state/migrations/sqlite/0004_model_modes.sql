-- A model's mode (pipelines/model_lineup.py) is kept with each job, as routing found it: a
-- shadow job's result is never delivered nor shown to readers, also after its model goes active.
-- The verdict and score beside the result's JSON: the shadow report (service/shadow_report.py)
-- compares thousands of jobs without decoding their per-slice and per-tile scores.
ALTER TABLE jobs ADD COLUMN mode TEXT NOT NULL DEFAULT 'active';
ALTER TABLE jobs ADD COLUMN present INTEGER;
ALTER TABLE jobs ADD COLUMN score REAL;
UPDATE jobs SET present=json_extract(result, '$.present'), score=json_extract(result, '$.score')
    WHERE result IS NOT NULL AND json_valid(result);
CREATE INDEX jobs_model_finished ON jobs(model_name, finished_at);

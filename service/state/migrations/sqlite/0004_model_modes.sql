-- A model's mode (pipelines/model_lineup.py) is kept with each job, as routing found it: a
-- shadow job's result is never delivered nor shown to readers, also after its model goes active.
ALTER TABLE jobs ADD COLUMN mode TEXT NOT NULL DEFAULT 'active';

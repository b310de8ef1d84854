"""`befund model check|bench|evaluate`: the ML engineer's tools around one model folder.

Each command writes JSON and PNG into one report folder and records where every figure came
from (service/model_tools/provenance.py). They use the node as it runs (the model service,
`befund serve`, DICOM in and SR out), never a second implementation of it.
"""

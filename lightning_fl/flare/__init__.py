"""Deployment on NVIDIA FLARE: the same site module, method and server strategy as `fit`, with
NVFlare carrying the messages between the hospitals (`lightning-fl export-nvflare`).

`job` builds and exports the NVFlare job; `server` is its server-side workflow (this project's
`server.Server` driven by NVFlare's `ModelController`); `client` is what each site runs through
NVFlare's Client API (`site_script.py` is the file the job ships). Needs `lightning-fl[nvflare]`.
"""

CONFIG_FILE = "lightning_fl.yaml"  # the run's resolved config, in every app's config folder
TRAIN, VALIDATE = "train", "validate"  # the two tasks a site answers
# meta keys of the messages (beyond NVFlare's own)
VALIDATE_RECEIVED = "validate_received"  # server → site: score the received model first
RUN_ID, SAVED_ROUND = "run_id", "saved_round"  # server → site: whose run, and the round its state.ckpt holds
NUM_CASES, TRAIN_METRICS = "num_cases", "train_metrics"  # site → server
# site → server, in the metrics beside the Dice: why its round failed (NVFlare sends no answer
# that holds neither weights nor metrics)
DROPPED = "dropped"

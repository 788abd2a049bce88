"""What every site of an exported NVFlare job runs (NVFlare's Client API, one process per site):
`python3 -u custom/site_script.py --data-root DIR`. The code lives in the installed package."""

from lightning_fl.flare.client import main

if __name__ == "__main__":
    main()

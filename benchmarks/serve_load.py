"""Load-test an OpenAI-compatible endpoint: the same tool as `gptoss-ray bench`.

    python benchmarks/serve_load.py --base-url http://127.0.0.1:8000/v1 --concurrency 1,4,16 \
        --num-requests 64 --input-len 128 --output-len 64 --output out.json --plot out.png
"""

import sys

from gptoss_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))

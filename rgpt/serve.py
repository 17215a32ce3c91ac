"""python -m rgpt.serve [checkpoint=PATH] [port=8000] [host=127.0.0.1] [key=value ...]

Serves a trained model over HTTP (every key: ServeConfig in rgpt/inference/server.py; `--cfg job` prints
them): OpenAI's POST /v1/chat/completions (streamed or not), GET /v1/models, GET /health, and a chat page at
/. One model is loaded, in a decoding process of its own (rgpt.inference.decoder); requests queue there
and are decoded together (rgpt.inference.engine is the web side's handle on it).
The address it listens on is printed to stderr once it accepts connections; Ctrl-C stops it.
An API key is best given as RGPT_API_KEY=KEY in the environment (api_key=KEY works too, but every
user of the machine sees a command line in ps); a host other than loopback needs one.
"""

import sys

import torch

from rgpt.cli import hydra_main, quote_text_overrides, settings
from rgpt.inference.server import ServeConfig, api_key_from, serve

TEXT_KEYS = ("checkpoint", "out_dir", "host", "api_key", "model_name")  # quoted for Hydra (see rgpt.cli)


@hydra_main("serve", ServeConfig)
def _main(cfg) -> None:
    c = settings(ServeConfig, cfg)
    c.api_key = api_key_from(c.api_key)
    device = c.runtime.apply()
    try:
        serve(c, device)
    except KeyboardInterrupt:  # Ctrl-C is the way to stop a server: exit 0
        print("stopped", file=sys.stderr)


def main() -> None:
    sys.argv[1:] = quote_text_overrides(sys.argv[1:], TEXT_KEYS)
    with torch.no_grad():
        _main()


if __name__ == "__main__":
    main()

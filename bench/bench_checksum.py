"""The cost of checkpoint integrity: the checksums and finite checks of a train state (params, EMA,
optimiser state; `dit_jax.checkpoint.integrity`), next to the save they come with.

    python bench/bench_checksum.py                    # the demo's model (configs/demo.py)
    python bench/bench_checksum.py --model XL/2       # an official model (configs/dit.py)

Prints the median over --repeats of the digests alone (what every save and restore adds) and of
a synchronous save of the same state (orbax, to a temporary directory), in milliseconds, and
writes bench/results/checksum_<platform>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402

from dit_jax.checkpoint import Checkpoints, digests  # noqa: E402
from dit_jax.sharding import make_mesh  # noqa: E402
from dit_jax.train.state import create_train_state, make_optimizer, model_config_from  # noqa: E402


def config_of(model: str):
    if model == "demo":
        from configs import demo
        config = demo.get_config()
        return config, model_config_from(config, num_classes=4, in_channels=3, input_size=32)
    from configs import dit
    config = dit.get_config(model)
    return config, model_config_from(config, num_classes=1000, in_channels=4, input_size=32)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help="'demo' or a configs/dit.py name (XL/2)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--save-repeats", type=int, default=3)
    args = parser.parse_args()

    config, cfg = config_of(args.model)
    tx, _ = make_optimizer(config.optim, int(config.total_steps))
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    with jax.set_mesh(mesh):
        state = create_train_state(cfg, tx, mesh, seed=0)
        items = {"params": state.params, "ema": state.ema, "opt_state": state.opt_state}
        count = sum(x.size for x in jax.tree.leaves(items))
        digests(items)  # compile
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            digests(items)
            times.append(time.perf_counter() - start)
        saves = []
        with tempfile.TemporaryDirectory() as tmp:
            checkpoints = Checkpoints(tmp, async_save=False, keep=1)
            for i in range(args.save_repeats):
                state = state.replace(step=state.step + 1)
                start = time.perf_counter()
                checkpoints.save(state, data_state={"next_batch": i}, model_config=cfg)
                checkpoints.wait()
                saves.append(time.perf_counter() - start)
            checkpoints.close()
    row = {"model": args.model, "platform": jax.devices()[0].platform,
           "device": jax.devices()[0].device_kind, "elements": int(count),
           "checksum_ms": 1e3 * statistics.median(times),
           "save_ms_with_checksum": 1e3 * statistics.median(saves)}
    print(json.dumps(row, indent=2))
    out = ROOT / "bench" / "results" / f"checksum_{row['platform']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out.read_text()) if out.is_file() else []
    out.write_text(json.dumps([r for r in previous if r["model"] != args.model] + [row],
                              indent=2) + "\n")


if __name__ == "__main__":
    main()

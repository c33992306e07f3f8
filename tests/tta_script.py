"""Run by tests as a subprocess: `adapt_dataset` with TPT over the procedural benchmark's shifted split, writing
to OUT; `--sleep` slows each batch down so that the process can be killed mid-run. Prints the result as JSON."""
import argparse
import json
import time

import torch

import promptkit
from promptkit.data import ProceduralBenchmark


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds per batch")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    clip = promptkit.load_clip("test-vit")
    data = ProceduralBenchmark().split("shifted")
    learner = promptkit.CoOp(clip, data.classnames, ctx_init="a photo of a")
    adapter = promptkit.TPT(learner, n_views=4, augment="crop")
    adapt = adapter.adapt_views
    adapter.adapt_views = lambda views: (time.sleep(args.sleep), adapt(views))[1]
    result = promptkit.adapt_dataset(adapter, data, batch_size=3, indices=range(0, 48, 2), out=args.out,
                                     resume=args.resume, progress=False)
    print(json.dumps({k: v for k, v in result.items() if k != "predictions"}))


if __name__ == "__main__":
    main()

"""Run by tests (plain python or torchrun): trains a method on a tiny fixed problem.

Each rank draws its initial prompts from its own seed (`torch.manual_seed(rank)`), so equality with one
process shows that the trainer starts every rank from rank 0's prompts. Every rank saves its final prompts
as OUT/rank<r>.safetensors."""
import argparse
import os
import time

import torch

import promptkit
from promptkit.checkpoint import save_tensors
from promptkit.data import ProceduralBenchmark


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("epochs", type=int)
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds per epoch (to be killed mid-run)")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--method", default="coop")
    parser.add_argument("--accum", type=int, default=1)
    parser.add_argument("--objectives", nargs="*", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    clip = promptkit.load_clip("test-vit")
    train = ProceduralBenchmark().split("train", shots=4, classes="base")
    torch.manual_seed(rank)
    learner = promptkit.create_learner(args.method, clip, train.classnames, n_ctx=4, ctx_init=None,
                                       objectives=args.objectives)
    learner.on_epoch_end = lambda epoch, epochs: time.sleep(args.sleep)
    config = promptkit.TrainConfig(epochs=args.epochs, batch_size=16, lr=0.05, output_dir=args.out, progress=False,
                                   cache_image_features=False, grad_accum_steps=args.accum)
    promptkit.PromptTrainer(learner, config).fit(train, resume=args.resume)
    save_tensors(learner.prompt_state_dict(), f"{args.out}/rank{rank}.safetensors")


if __name__ == "__main__":
    main()

"""Run by tests (plain python or torchrun): trains CoOp on a tiny fixed problem; `slow` sleeps per epoch."""
import sys
import time

import torch

import promptkit
from promptkit.data import ProceduralBenchmark


class SlowCoOp(promptkit.CoOp):
    def on_epoch_end(self, epoch, epochs):
        time.sleep(float(sys.argv[3]))


def main():
    out, epochs = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(1)
    clip = promptkit.load_clip("test-vit")
    train = ProceduralBenchmark().split("train", shots=4, classes="base")
    torch.manual_seed(0)
    learner = SlowCoOp(clip, train.classnames, n_ctx=4)
    config = promptkit.TrainConfig(epochs=epochs, batch_size=16, lr=0.05, output_dir=out, progress=False,
                                   cache_image_features=False)
    promptkit.PromptTrainer(learner, config).fit(train, resume=len(sys.argv) > 4)


if __name__ == "__main__":
    main()

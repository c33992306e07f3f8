"""Wrap an existing open_clip model, classify zero-shot, train CoOp's context for a few steps.

    python examples/zero_shot_and_coop.py                        # tiny random model, offline
    python examples/zero_shot_and_coop.py --arch ViT-B-16 --pretrained /path/to/ViT-B-16.bin --quick-gelu

With random weights the numbers mean nothing; the point is the API. Use `promptkit demo` for a
meaningful end-to-end run on the embedded pretrained model.
"""
import argparse

import open_clip
import torch
import torch.nn.functional as F

import promptkit


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default=None, help="open_clip architecture; default: a tiny random CLIP")
    parser.add_argument("--pretrained", default=None, help="open_clip tag or local checkpoint file")
    parser.add_argument("--quick-gelu", action="store_true", help="set for a local file of OpenAI weights")
    args = parser.parse_args()

    # Any open_clip CLIP works: here we build one ourselves, as an existing pipeline would have.
    if args.arch:
        model, _, preprocess = open_clip.create_model_and_transforms(
            args.arch, pretrained=args.pretrained, force_quick_gelu=args.quick_gelu)
    else:
        model = open_clip.model.CLIP(32, vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2),
                                     text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2))
        preprocess = None
    clip = promptkit.FrozenCLIP(model, preprocess=preprocess, arch=args.arch, pretrained=args.pretrained)

    classnames = ["cat", "dog", "car", "airplane"]
    size = model.visual.image_size
    size = size[0] if isinstance(size, tuple) else size
    images, labels = torch.randn(16, 3, size, size), torch.arange(16) % 4

    zero_shot = promptkit.ZeroShotCLIP(clip, classnames, templates=promptkit.IMAGENET_TEMPLATES_7)
    with torch.no_grad():
        print("zero-shot predictions:", zero_shot(images).argmax(-1).tolist())

    coop = promptkit.CoOp(clip, classnames, n_ctx=4, ctx_init="a photo of a")
    optimizer = torch.optim.SGD(coop.prompt_parameters(), lr=0.002, momentum=0.9)
    for step in range(5):
        loss = F.cross_entropy(coop(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        print(f"CoOp step {step}: loss {loss.item():.4f}")
    coop.save_pretrained("coop_prompts")
    print("saved learned context to coop_prompts/ (", promptkit.load_pretrained("coop_prompts", clip).method, ")")


if __name__ == "__main__":
    main()

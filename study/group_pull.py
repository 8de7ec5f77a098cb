"""How far a grouped prediction is pulled towards its group-mates' (study/README.md,
"Is it the estimate or the images?").

Held-out images (an `encode`d set, in groups of the largest N as `branch_loss` lays them
out) are noised to a few times t with fixed noise; each branch predicts the clean image
x0-hat one by one (N = 1) and in groups of N. For each N it prints the mean per-image
contrast (pixel standard deviation) of x0-hat and the pull: the least-squares slope of
x0-hat(N) - x0-hat(1) onto mean-over-the-group(x0-hat(1)) - x0-hat(1). A pull of 0 means
the group changes nothing; 1 would mean every image is replaced by its group's mean.
Next to it, the useful pull: the slope of x0 - x0-hat(1) onto the same direction, the
pull that would bring x0-hat(1) closest to the clean images. Mates that resemble an image
make it positive; a pull above it moves images towards their mates more than the mates
warrant. The groups are those of the set's embeddings (similarity groups, as training
forms them) or, without embeddings, of its classes (as `sample` groups images).
Under CFG the conditional prediction is added (weight w) and the unconditional one
subtracted (weight w - 1), so a pull in the conditional branch greys the samples and one
in the unconditional branch sharpens them.

    python study/group_pull.py CKPT EVAL_DATA [--group-sizes 1,4,16] [--times 0.3,0.5,0.8]
"""

from __future__ import annotations

import argparse

import torch

from groupdiff_cli.data.loader import read_dataset
from groupdiff_cli.evaluation.branch_loss import heldout_latents
from groupdiff_cli.science.checkpoints import load_model
from groupdiff_cli.science.objectives import create, of_run


def contrast(x: torch.Tensor) -> float:
    return x.flatten(1).std(1).mean().item()


def pull(target: torch.Tensor, single: torch.Tensor, n: int) -> float:
    """Slope of (target - single) onto (group mean of single - single), groups of n."""
    mates = single.view(-1, n, *single.shape[1:]).mean(1, keepdim=True).expand(-1, n, *single.shape[1:])
    toward = (mates.reshape(single.shape) - single).flatten(1)
    moved = (target - single).flatten(1)
    return ((moved * toward).sum() / (toward * toward).sum()).item()


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt")
    p.add_argument("eval_data", help="an `encode`d set of held-out images; laid out in similarity groups "
                   "when its shards have embeddings, else in class groups")
    p.add_argument("--group-sizes", default="1,4,16")
    p.add_argument("--times", default="0.3,0.5,0.8")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    sizes = sorted(int(n) for n in args.group_sizes.split(","))
    model, info = load_model(args.ckpt, "ema")
    model.eval()
    objective = create(of_run(info), model.learn_sigma)
    if objective.name != "flow":
        raise SystemExit("group_pull.py reads x0-hat from a velocity: flow-matching (SiT) checkpoints only")
    heldout = read_dataset(args.eval_data, "EVAL_DATA")
    x0, labels = heldout_latents(heldout, args.images, max(sizes), seed=args.seed)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(args.seed))
    layout = "class" if heldout.get("embedder") in (None, "none") else "similarity"  # as heldout_latents lays them out
    print(f"{len(x0)} held-out images in {layout} groups, contrast {contrast(x0):.4f} (pixels in [-1, 1])")
    for t in (float(s) for s in args.times.split(",")):
        xt, t_net = objective.noisy(x0, torch.full((len(x0),), t), noise)
        for branch, y in (("cond", labels), ("null", torch.full_like(labels, model.num_classes))):
            x0_hat = {}
            for n in sizes:
                out = model(xt, t_net, y, group_size=n, generator=torch.Generator().manual_seed(args.seed)).float()
                x0_hat[n] = xt - t * objective.velocity(out, x0.shape[1])
            single = x0_hat[sizes[0]]
            cells = [f"N={n}: contrast {contrast(x0_hat[n]):.4f}"
                     + (f", pull {pull(x0_hat[n], single, n):+.4f} (useful {pull(x0, single, n):+.4f})"
                        if n > 1 else "") for n in sizes]
            print(f"t={t:.2f} {branch:4s} " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()

"""Train the bundled tiny VQA LLaVA (``assets/tiny-vqa-llava``) on :mod:`vtr.bench.synthqa_v1`. CPU, seeded, resumable.

Two stages:

1. ``--pretrain-steps``: the CLIP-style vision tower alone, with per-patch auxiliary heads (colour,
   shape, colour x shape, coarse position of every patch) on the features the LLaVA projector reads.
2. ``--steps``: the whole model. Each image carries ``--qpi`` questions packed as a multi-turn
   conversation (``USER: <image> q1 ASSISTANT: a1</s> USER: q2 ASSISTANT: a2</s> ...``) so the
   vision tower and the image tokens are paid once per image; cross-entropy on the answer words plus
   the auxiliary loss. Question types are weighted towards existence and location.

The batch of step ``s`` is a pure function of ``(--seed, s)``, so ``--resume`` continues exactly.
Checkpoints (model, heads, optimiser, step) go to ``--work`` every ``--ckpt-every`` steps; the
best-on-validation model is exported with ``save_pretrained`` to ``--work/best`` and, at the end, the
final one to ``--out``.

    nohup python scripts/train_tiny_vqa.py > /tmp/tiny_vqa.log 2>&1 &

A continuation with a fresh LR schedule (``--extra-min``), strong row/column auxiliary loss and
left/right-heavy location questions (``--tb-keep``), as used for the bundled checkpoint:

    python scripts/train_tiny_vqa.py --pretrain-steps 500 --steps 5000 --resume --extra-min 34 --lr 3e-4 \
        --warmup 40 --decay-from 0.35 --pos-aux-weight 1.0 --tb-keep 0.35 \
        --type-weights colour=0.4,shape=0.3,count=2.0,exist=0.6,location=3.0
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vtr.bench import synthqa_v1 as synthqa
from vtr.testing import tiny_llava

MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
TYPE_WEIGHTS = {"colour": 1.0, "shape": 1.0, "count": 1.3, "exist": 1.6, "location": 1.6}


def build_model(seed: int):
    """The untrained tiny LLaVA: 128-d 4-layer CLIP tower (patch 16, 196 tokens + CLS), 192-d 3-layer Llama."""
    model, processor = tiny_llava(
        image_size=synthqa.IMAGE_SIZE,
        patch_size=synthqa.PATCH_SIZE,
        vision_hidden=128,
        vision_layers=4,
        text_hidden=192,
        text_layers=3,
        seed=seed,
        words=synthqa.WORDS,
    )
    model.config.vision_feature_layer = -1  # use every tower layer
    return model, processor


class AuxHeads(nn.Module):
    """Per-patch heads: colour (6), shape (5), colour x shape (21), column (14), row (14)."""

    def __init__(self, dim: int, pos_weight: float = 0.3):
        super().__init__()
        self.pos_weight = pos_weight
        nc, ns = len(synthqa.COLOURS) + 1, len(synthqa.SHAPES) + 1
        self.colour = nn.Linear(dim, nc)
        self.shape = nn.Linear(dim, ns)
        self.combo = nn.Linear(dim, (nc - 1) * (ns - 1) + 1)
        self.col = nn.Linear(dim, synthqa.GRID)
        self.row = nn.Linear(dim, synthqa.GRID)
        self.ns = ns - 1

    def loss(self, feats: torch.Tensor, pc: torch.Tensor, ps: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """``feats`` (B, 196, D); ``pc``/``ps`` (B, 196) labels. Object patches weigh 5x background."""
        b, n, _ = feats.shape
        obj = pc > 0
        w = torch.where(obj, 5.0, 1.0).flatten()
        combo = torch.where(obj, (pc - 1) * self.ns + (ps - 1) + 1, 0)
        g = synthqa.GRID
        idx = torch.arange(n)
        cols = (idx % g).expand(b, n)
        rows = (idx // g).expand(b, n)
        f = feats.float()
        total = 0.0
        for head, y in ((self.colour, pc), (self.shape, ps), (self.combo, combo)):
            ce = F.cross_entropy(head(f).flatten(0, 1), y.flatten(), reduction="none")
            total = total + (ce * w).sum() / w.sum()
        col_logits, row_logits = self.col(f), self.row(f)
        total = total + self.pos_weight * (
            F.cross_entropy(col_logits.flatten(0, 1), cols.flatten())
            + F.cross_entropy(row_logits.flatten(0, 1), rows.flatten())
        )
        with torch.no_grad():
            ok = (self.colour(f).argmax(-1) == pc) & (self.shape(f).argmax(-1) == ps)
            acc_obj = ok[obj].float().mean().item() if obj.any() else 0.0
            acc_col = (col_logits.argmax(-1) == cols).float().mean().item()
            acc_row = (row_logits.argmax(-1) == rows).float().mean().item()
        return total, {"aux_obj_acc": acc_obj, "aux_col_acc": acc_col, "aux_row_acc": acc_row}


def pixels(images: list[np.ndarray]) -> torch.Tensor:
    """CLIP normalisation, identical to the saved ``CLIPImageProcessor`` on 224x224 inputs."""
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    return (x - MEAN) / STD


class Batcher:
    """Builds packed training batches and single-turn evaluation batches as token ids."""

    def __init__(self, tokenizer, n_image_tokens: int, tb_keep: float = 1.0):
        self.tok = tokenizer
        self.tb_keep = tb_keep  # probability of keeping a drawn top/bottom location question
        self.n_img = n_image_tokens
        self.image_id = tokenizer.convert_tokens_to_ids("<image>")
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id
        self.user = self.ids("USER :")
        self.assistant = self.ids("ASSISTANT :")
        self.answer_ids = torch.tensor([self.tok.convert_tokens_to_ids(a) for a in synthqa.ANSWERS])
        self._cache: dict[str, list[int]] = {}

    def ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def q_ids(self, q: str) -> list[int]:
        if q not in self._cache:
            self._cache[q] = self.ids(q)
        return self._cache[q]

    def prompt(self, question: str) -> list[int]:
        return self.user + [self.image_id] * self.n_img + self.q_ids(question) + self.assistant

    def train_batch(self, step: int, seed: int, batch: int, qpi: int, weights: dict[str, float]):
        rng = np.random.default_rng([seed, 77, step])
        types = list(weights)
        p = np.array([weights[t] for t in types])
        p = p / p.sum()
        images, pcs, pss, seqs, targets = [], [], [], [], []
        for _ in range(batch):
            scene = synthqa.make_scene(rng)
            ids: list[int] = []
            tgt: list[tuple[int, int]] = []
            turns = 0
            attempts = 0
            while turns < qpi and attempts < 4 * qpi:
                attempts += 1
                qtype = types[rng.choice(len(types), p=p)]
                qa = synthqa.ask(scene, qtype, rng)
                if qa is None:
                    continue
                if qtype == "location" and qa[1] in ("top", "bottom") and rng.random() >= self.tb_keep:
                    continue  # re-draw: tilts location questions towards left/right
                q, a = qa
                ids += self.user + ([self.image_id] * self.n_img if turns == 0 else []) + self.q_ids(q)
                ids += self.assistant
                tgt.append((len(ids) - 1, self.tok.convert_tokens_to_ids(a)))
                ids += [self.tok.convert_tokens_to_ids(a), self.eos]
                turns += 1
            images.append(scene.image)
            pcs.append(scene.patch_colour.flatten())
            pss.append(scene.patch_shape.flatten())
            seqs.append(ids)
            targets.append(tgt)
        L = max(len(s) for s in seqs)
        input_ids = torch.full((batch, L), self.pad, dtype=torch.long)
        mask = torch.zeros((batch, L), dtype=torch.long)
        for i, s in enumerate(seqs):
            input_ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        rows = torch.tensor([i for i, t in enumerate(targets) for _ in t])
        cols = torch.tensor([c for t in targets for c, _ in t])
        ys = torch.tensor([y for t in targets for _, y in t])
        return (
            pixels(images),
            torch.from_numpy(np.stack(pcs)),
            torch.from_numpy(np.stack(pss)),
            input_ids,
            mask,
            (rows, cols, ys),
        )

    def eval_batch(self, samples: list[synthqa.Sample]):
        seqs = [self.prompt(s.question) for s in samples]
        L = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), L), self.pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), L), dtype=torch.long)
        for i, s in enumerate(seqs):  # left padding, as at inference
            input_ids[i, L - len(s):] = torch.tensor(s)
            mask[i, L - len(s):] = 1
        return pixels([s.image for s in samples]), input_ids, mask


def tower_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    out = model.model.vision_tower(pixel_values, output_hidden_states=True)
    return out.hidden_states[model.config.vision_feature_layer][:, 1:]


def lm_logits_at(model, feats, input_ids, mask, rows, cols) -> torch.Tensor:
    """The LLaVA forward by hand (projector, splice, LM), logits only where ``(rows, cols)`` point."""
    img = model.model.multi_modal_projector(feats)
    emb = model.model.get_input_embeddings()(input_ids)
    sel = input_ids == model.config.image_token_id
    emb = emb.masked_scatter(sel.unsqueeze(-1), img.to(emb.dtype).reshape(-1, emb.shape[-1]))
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    h = model.model.language_model(inputs_embeds=emb, attention_mask=mask, position_ids=pos).last_hidden_state
    return model.lm_head(h[rows, cols])


@torch.no_grad()
def evaluate(model, batcher: Batcher, samples: list[synthqa.Sample], bs: int = 50) -> dict[str, float]:
    """Accuracy = argmax over the answer vocabulary of the next-token logits after ``ASSISTANT:``."""
    model.eval()
    correct: dict[str, list[int]] = {t: [] for t in synthqa.QUESTION_TYPES}
    for i in range(0, len(samples), bs):
        chunk = samples[i: i + bs]
        pv, ids, mask = batcher.eval_batch(chunk)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            feats = tower_features(model, pv)
            rows = torch.arange(len(chunk))
            cols = torch.full((len(chunk),), ids.shape[1] - 1)
            logits = lm_logits_at(model, feats, ids, mask, rows, cols).float()
        pred = batcher.answer_ids[logits[:, batcher.answer_ids].argmax(-1)]
        for s, p in zip(chunk, pred.tolist(), strict=True):
            correct[s.qtype].append(int(p == batcher.tok.convert_tokens_to_ids(s.answer)))
    model.train()
    res = {t: float(np.mean(v)) for t, v in correct.items() if v}
    res["overall"] = float(np.mean([x for v in correct.values() for x in v]))
    return res


def lr_at(step: int, total: int, peak: float, warmup: int = 150, decay_from: float = 0.75) -> float:
    """Linear warm-up, flat at ``peak`` until ``decay_from`` of the run, then cosine to 5%."""
    if step < warmup:
        return peak * (step + 1) / warmup
    start = int(decay_from * total)
    if step < start:
        return peak
    t = (step - start) / max(1, total - start)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def lr_at_progress(p: float, s2: int, peak: float, warmup: int = 150, decay_from: float = 0.7) -> float:
    """Like :func:`lr_at` but driven by run progress ``p`` in [0, 1] (steps or clock, whichever is ahead)."""
    if s2 < warmup:
        return peak * (s2 + 1) / warmup
    if p < decay_from:
        return peak
    t = min(1.0, (p - decay_from) / (1.0 - decay_from))
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "assets" / "tiny-vqa-llava"))
    ap.add_argument("--work", default="/tmp/tiny_vqa_work", help="checkpoints and best-so-far export")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pretrain-steps", type=int, default=400, help="tower-only auxiliary steps")
    ap.add_argument("--pretrain-batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3000, help="full-model steps")
    ap.add_argument("--batch", type=int, default=32, help="images per step")
    ap.add_argument("--qpi", type=int, default=8, help="questions per image")
    ap.add_argument("--lr", type=float, default=8e-4)
    ap.add_argument("--aux-weight", type=float, default=0.5)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--eval-n", type=int, default=500)
    ap.add_argument("--ckpt-every", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--budget-min", type=float, default=None,
        help="wall-clock budget in minutes: stages end and the LR decays by whichever comes first, the step "
        "counts or the clock (for shared CPUs; data stay a function of the step, timing does not)",
    )
    ap.add_argument("--pretrain-frac", type=float, default=0.12, help="budget share of the tower-only stage")
    ap.add_argument(
        "--type-weights", default=None,
        help="question-type sampling weights, e.g. 'exist=2.2,location=2.2' (others keep the defaults)",
    )
    ap.add_argument(
        "--pos-aux-weight", type=float, default=0.3,
        help="weight of the per-patch row and column auxiliary losses (inside the auxiliary loss)",
    )
    ap.add_argument(
        "--tb-keep", type=float, default=1.0,
        help="keep a drawn top/bottom location question with this probability, else re-draw (< 1 favours left/right)",
    )
    ap.add_argument("--warmup", type=int, default=150, help="full-stage LR warm-up steps")
    ap.add_argument(
        "--decay-from", type=float, default=0.7, help="run progress at which the full-stage LR decay starts"
    )
    ap.add_argument(
        "--extra-min", type=float, default=None,
        help="with --resume: a fresh schedule for the continuation: --extra-min minutes (and at most --steps "
        "more full steps) from now, with its own --warmup and decay to 5%% of --lr; --budget-min is then ignored",
    )
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--no-bf16", action="store_true")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    weights = dict(TYPE_WEIGHTS)
    for item in filter(None, (args.type_weights or "").split(",")):
        k, v = item.split("=")
        if k not in weights:
            raise SystemExit(f"unknown question type {k!r} in --type-weights; expected {list(weights)}")
        weights[k] = float(v)
    torch.manual_seed(args.seed)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model, processor = build_model(args.seed)
    n_img = (synthqa.IMAGE_SIZE // synthqa.PATCH_SIZE) ** 2
    batcher = Batcher(processor.tokenizer, n_img, tb_keep=args.tb_keep)
    heads = AuxHeads(model.config.vision_config.hidden_size, pos_weight=args.pos_aux_weight)
    tower_params = list(model.model.vision_tower.parameters()) + list(heads.parameters())
    opt_pre = torch.optim.AdamW(tower_params, lr=1e-3, weight_decay=0.01)
    opt = torch.optim.AdamW(list(model.parameters()) + list(heads.parameters()), lr=args.lr, weight_decay=0.01)
    step = 0  # global: [0, pre_end) tower only, then full
    pre_end = args.pretrain_steps
    elapsed0 = 0.0  # wall seconds spent before a --resume
    full_t0: float | None = None  # elapsed seconds when the full stage began
    budget = None if args.budget_min is None else 60.0 * args.budget_min
    best = -1.0
    s_base = 0  # full-stage step at which the current LR schedule started (non-zero after --extra-min)
    ckpt = work / "ckpt.pt"
    if args.resume and ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        heads.load_state_dict(state["heads"])
        opt_pre.load_state_dict(state["opt_pre"])
        opt.load_state_dict(state["opt"])
        step, best = state["step"], state["best"]
        elapsed0 = state.get("elapsed", 0.0)
        pre_end = state.get("pre_end", pre_end)
        full_t0 = state.get("full_t0", full_t0)
        s_base = state.get("s_base", 0)
        print(f"resumed at step {step} (best val {best:.3f})", flush=True)
        if args.extra_min is not None:
            if step < pre_end:
                raise SystemExit("--extra-min continues the full stage; the checkpoint is still pretraining")
            s_base = step - pre_end
            full_t0 = elapsed0
            budget = elapsed0 + 60.0 * args.extra_min
            print(f"fresh schedule: {args.extra_min} min / {args.steps} steps from full step {s_base}", flush=True)
    elif args.extra_min is not None:
        raise SystemExit("--extra-min needs --resume and a checkpoint in --work")
    val = synthqa.split("validation", args.eval_n)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=not args.no_bf16)
    model.train()
    t0 = time.time() - elapsed0

    def clock() -> float:
        return time.time() - t0

    def full_progress(s2: int) -> float:
        p = (s2 - s_base) / args.steps
        if budget is not None and full_t0 is not None:
            p = max(p, (clock() - full_t0) / max(1.0, budget - full_t0))
        return p

    run_loss = run_aux = run_acc = 0.0
    n_log = 0
    while True:
        if step < pre_end and budget is not None and clock() > args.pretrain_frac * budget:
            pre_end = step
            print(f"pretraining stage ends at step {step} (time budget)", flush=True)
        if step >= pre_end and full_t0 is None:
            full_t0 = clock()
        if step >= pre_end and full_progress(step - pre_end) >= 1.0:
            break
        if step < pre_end:
            rng = np.random.default_rng([args.seed, 55, step])
            scenes = [synthqa.make_scene(rng) for _ in range(args.pretrain_batch)]
            pv = pixels([s.image for s in scenes])
            pc = torch.from_numpy(np.stack([s.patch_colour.flatten() for s in scenes]))
            ps = torch.from_numpy(np.stack([s.patch_shape.flatten() for s in scenes]))
            for g in opt_pre.param_groups:
                g["lr"] = lr_at(step, args.pretrain_steps, 1e-3, warmup=50, decay_from=1.0)
            with autocast:
                aux, info = heads.loss(tower_features(model, pv), pc, ps)
            opt_pre.zero_grad(set_to_none=True)
            aux.backward()
            torch.nn.utils.clip_grad_norm_(tower_params, 1.0)
            opt_pre.step()
            loss_v = 0.0
        else:
            s2 = step - pre_end
            pv, pc, ps, ids, mask, (rows, cols, ys) = batcher.train_batch(
                s2, args.seed, args.batch, args.qpi, weights
            )
            for g in opt.param_groups:
                g["lr"] = lr_at_progress(
                    full_progress(s2), s2 - s_base, args.lr, warmup=args.warmup, decay_from=args.decay_from
                )
            with autocast:
                feats = tower_features(model, pv)
                aux, info = heads.loss(feats, pc, ps)
                logits = lm_logits_at(model, feats, ids, mask, rows, cols)
            loss = F.cross_entropy(logits.float(), ys)
            opt.zero_grad(set_to_none=True)
            (loss + args.aux_weight * aux).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            loss_v = loss.item()
            with torch.no_grad():
                run_acc += (logits.argmax(-1) == ys).float().mean().item()
        run_loss += loss_v
        run_aux += aux.item()
        n_log += 1
        step += 1
        if step % 20 == 0:
            el = time.time() - t0
            print(
                f"step {step} {'pre' if step <= pre_end else 'full'} lr {opt.param_groups[0]['lr']:.2e} "
                f"loss {run_loss / n_log:.4f} aux {run_aux / n_log:.4f} train_acc {run_acc / n_log:.3f} "
                f"aux_obj_acc {info['aux_obj_acc']:.3f} col/row {info['aux_col_acc']:.2f}/{info['aux_row_acc']:.2f} "
                f"elapsed {el / 60:.1f} min",
                flush=True,
            )
            run_loss = run_aux = run_acc = 0.0
            n_log = 0
        do_eval = step > pre_end and (step - pre_end) % args.eval_every == 0
        if do_eval:
            res = evaluate(model, batcher, val)
            print("eval " + json.dumps({"step": step, **{k: round(v, 3) for k, v in res.items()}}), flush=True)
            if res["overall"] > best:
                best = res["overall"]
                export(model, processor, work / "best")
                print(f"new best {best:.3f} exported to {work / 'best'}", flush=True)
        if step % args.ckpt_every == 0:
            tmp = work / "ckpt.pt.tmp"
            torch.save(
                {"model": model.state_dict(), "heads": heads.state_dict(), "opt_pre": opt_pre.state_dict(),
                 "opt": opt.state_dict(), "step": step, "best": best, "elapsed": clock(),
                 "pre_end": pre_end, "full_t0": full_t0, "s_base": s_base},
                tmp,
            )
            tmp.replace(ckpt)
    res = evaluate(model, batcher, val)
    print("eval " + json.dumps({"step": step, "final": True, **{k: round(v, 3) for k, v in res.items()}}), flush=True)
    export(model, processor, work / "final")
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    export(model, processor, out)
    print(f"done in {(time.time() - t0) / 60:.1f} min; final model saved to {out}", flush=True)
    return 0


def export(model, processor, path: Path) -> None:
    """``save_pretrained`` (safetensors, fp32) of model and processor, in eval mode."""
    was = model.training
    model.eval()
    path.mkdir(parents=True, exist_ok=True)
    # The model answers with one word and is not trained to emit an end token: stop after the answer.
    model.generation_config.max_new_tokens = 1
    model.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    model.train(was)


if __name__ == "__main__":
    raise SystemExit(main())

"""Training a Dovetail draft on self-distillation shards (EAGLE's recipe, adapted).

Each training pair is (target feature at t-1, token at t) -> the target's
feature at t and its next-token distribution. Loss:

    SmoothL1(predicted feature, target feature) + 0.1 * CE(draft logits, target distribution)

with uniform feature noise on the inputs, AdamW with warm-up and linear decay,
and gradient clipping. With ``unroll`` > 1 the draft is also run on its own
predictions (a training-time test, as in EAGLE-3), the way deeper tree nodes
see it at inference; pass j's loss is weighted 0.8^j.

``accelerate`` (the ``[train]`` extra) places the work: bf16 autocast on a GPU,
plain fp32 on the CPU, DDP across GPUs when launched with ``accelerate launch``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DovetailError, InvalidArgumentError
from ..extras import require
from ..gguf_io import read_facts, read_token_matrices
from ..draft.io import check_draft_output, check_pairing, config_for_target, load_draft, save_draft
from ..draft.model import DraftModel
from .config import TrainConfig
from .data import load_shards

log = logging.getLogger(__name__)


def token_frequencies(seqs, n_vocab: int) -> np.ndarray:
    counts = np.zeros(n_vocab, dtype=np.int64)
    for toks, _, plen in seqs:
        np.add.at(counts, toks[max(plen, 1) :], 1)
    return counts


def frequent_tokens(seqs, n_vocab: int, n: int) -> torch.Tensor:
    """The draft vocabulary: the ``n`` most frequent answer tokens (ties by id), sorted by id."""
    counts = token_frequencies(seqs, n_vocab)
    top = np.argsort(-counts, kind="stable")[:n]
    return torch.from_numpy(np.sort(top))


class Windows:
    """Fixed-length training windows over sequences, with the loss mask on answer positions."""

    def __init__(self, seqs, seq_len: int):
        self.items = []
        for s, (toks, _hid, plen) in enumerate(seqs):
            n = len(toks)
            if n < 3:
                continue
            for lo in range(0, n - 2, seq_len - 1):
                hi = min(lo + seq_len, n)
                # keep windows with a supervised pair: some t in lo+1..hi-1 with plen <= t+1 < n
                if max(lo + 1, plen - 1) <= min(hi - 1, n - 2):
                    self.items.append((s, lo, hi))
        self.seqs = seqs
        self.seq_len = seq_len

    def __len__(self) -> int:
        return len(self.items)

    def batch(self, idx) -> dict[str, torch.Tensor]:
        """Pairs: input feature h[t-1] and token x[t]; targets h[t]; mask where x[t+1] is an answer token."""
        L = self.seq_len - 1
        b = len(idx)
        d = self.seqs[0][1].shape[1]
        feat_in = np.zeros((b, L, d), dtype=np.float32)
        feat_out = np.zeros((b, L, d), dtype=np.float32)
        tok = np.zeros((b, L), dtype=np.int64)
        pos = np.zeros((b, L), dtype=np.int64)
        mask = np.zeros((b, L), dtype=bool)
        for r, i in enumerate(idx):
            s, lo, hi = self.items[i]
            toks, hid, plen = self.seqs[s]
            n = hi - lo - 1  # pairs t = lo+1 .. hi-1
            t = np.arange(lo + 1, hi)
            feat_in[r, :n] = hid[t - 1]
            feat_out[r, :n] = hid[t]
            tok[r, :n] = toks[t]
            pos[r, :n] = t
            mask[r, :n] = t + 1 >= plen  # the next token is part of the answer
            mask[r, :n] &= t + 1 < len(toks)
        return {k: torch.from_numpy(v) for k, v in
                dict(feat_in=feat_in, feat_out=feat_out, tok=tok, pos=pos, mask=mask).items()}


def loss_and_metrics(model: DraftModel, batch: dict, cfg: TrainConfig, noise: bool):
    """Weighted loss over the unrolled passes; metrics per pass (``acc`` is pass 0's, ``acc@j`` pass j's)."""
    x = batch["feat_in"]
    if noise and cfg.noise > 0:
        x = x + (torch.rand_like(x) - 0.5) * cfg.noise
    preds = model.unroll(x, batch["tok"], batch["pos"], cfg.unroll)
    m = batch["mask"]
    col = torch.nonzero(m)[:, 1]  # position in the window of every supervised row
    target = batch["feat_out"][m]
    with torch.no_grad():  # the target's distribution, once for all passes
        target_logits = model.logits(target)
        target_p = torch.softmax(target_logits.float(), -1)
        target_top = target_logits.argmax(-1)
    loss, metrics, total_w = 0.0, {}, 0.0
    for j, pred in enumerate(preds):
        keep = col >= j  # rows before j have no pass-(j-1) prediction to start from
        if not bool(keep.any()):  # windows too short for this pass
            break
        pred_j = pred[m][keep]
        feat_loss = F.smooth_l1_loss(pred_j.float(), target[keep].float())
        draft_logp = torch.log_softmax(model.logits(pred_j).float(), -1)
        ce = -(target_p[keep] * draft_logp).sum(-1).mean()
        w = 0.8**j
        loss = loss + w * (feat_loss + cfg.ce_weight * ce)
        total_w += w
        acc = (draft_logp.argmax(-1) == target_top[keep]).float().mean().item()
        if j == 0:
            metrics.update(feat=feat_loss.item(), ce=ce.item(), acc=acc)
        else:
            metrics[f"acc@{j}"] = acc
    if total_w == 0:  # no supervised row in this batch
        return None, {}
    loss = loss / total_w
    metrics["loss"] = loss.item()
    return loss, metrics


@torch.no_grad()
def evaluate(model: DraftModel, windows: Windows, cfg: TrainConfig, device) -> dict:
    model.eval()
    totals, n = {}, 0
    for lo in range(0, len(windows), cfg.batch_size):
        batch = {k: v.to(device) for k, v in windows.batch(list(range(lo, min(lo + cfg.batch_size, len(windows))))).items()}
        loss, metrics = loss_and_metrics(model, batch, cfg, noise=False)
        if loss is None:
            continue
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + v
        n += 1
    model.train()
    return {k: v / max(n, 1) for k, v in totals.items()}


class _Objective(torch.nn.Module):
    """The training loss as a module, so that DDP's gradient hooks see every parameter it uses."""

    def __init__(self, model: DraftModel, cfg: TrainConfig):
        super().__init__()
        self.model, self.cfg = model, cfg

    def forward(self, batch: dict, noise: bool):
        return loss_and_metrics(self.model, batch, self.cfg, noise)


def split_heldout(seqs, cfg: TrainConfig) -> tuple[list, list]:
    """(held-out, training) sequences: ``heldout_fraction`` of them, at least one.

    Held out are the sequences whose prompt has the smallest seeded hash, so a
    prompt keeps its side of the split when more data is added or shards are
    reordered.
    """
    salt = cfg.seed.to_bytes(8, "little", signed=True)
    keys = [hashlib.blake2b(np.ascontiguousarray(toks[:plen]).tobytes(), digest_size=8, salt=salt).digest()
            for toks, _hid, plen in seqs]
    order = sorted(range(len(seqs)), key=keys.__getitem__)
    n_held = max(1, int(len(seqs) * cfg.heldout_fraction))
    return [seqs[i] for i in order[:n_held]], [seqs[i] for i in order[n_held:]]


def heldout_prompts(held, n: int) -> list[np.ndarray]:
    """Prompt tokens of up to ``n`` held-out sequences that have an answer to compare against."""
    return [toks[:plen] for toks, _hid, plen in held if plen < len(toks)][:n]


def _source_key(data_dirs, init_from) -> str:
    """A fingerprint of the data folders (their manifests) and the --init draft."""
    h = hashlib.sha256()
    for d in data_dirs:
        h.update(str(Path(d).resolve()).encode() + b"\0")
        try:
            h.update((Path(d) / "manifest.json").read_bytes())
        except OSError:
            pass
    if init_from is not None:
        h.update(str(Path(init_from).resolve()).encode())
    return h.hexdigest()[:16]


class TrainingDivergedError(DovetailError):
    """The loss or the weights became NaN or infinite; nothing is saved."""


def train_draft(target_path, data_dir, out_dir, cfg: TrainConfig | None = None, init_from=None,
                resume: bool = True, progress: bool = True, overwrite: bool = False) -> dict:
    """Train a draft for ``target_path`` on ``data_dir`` (one folder or several); writes the draft to ``out_dir``.

    ``out_dir`` must be new, or with ``overwrite`` an existing draft folder
    (checked before any work). Returns a report, which ends with τ measured
    through the real engine (greedy, default tree) on ``cfg.tau_prompts``
    held-out prompts.
    """
    Accelerator = require("accelerate", "training a draft").Accelerator
    from tqdm import tqdm

    cfg = cfg or TrainConfig()
    cfg.validate()
    check_draft_output(out_dir, overwrite)
    data_dirs = [data_dir] if isinstance(data_dir, (str, os.PathLike)) else list(data_dir)
    if not data_dirs:
        raise InvalidArgumentError("no data folder given")
    facts = read_facts(target_path)
    seqs = []
    for d in data_dirs:
        manifest, part = load_shards(d)
        if manifest["target"]["tokenizer_fingerprint"] != facts.tokenizer_fingerprint:
            raise InvalidArgumentError(f"{d} was generated by '{manifest['target']['name']}', not '{facts.name}'")
        seqs += part
    if len(seqs) < 4:
        raise InvalidArgumentError(f"{', '.join(map(str, data_dirs))} hold only {len(seqs)} sequences; generate more data")
    held, train = split_heldout(seqs, cfg)
    out = Path(out_dir)
    ckpt_dir = out.with_name(out.name + ".checkpoint")

    accelerator = Accelerator(mixed_precision="bf16" if torch.cuda.is_available() else "no")
    rank = accelerator.process_index
    rng = np.random.default_rng([cfg.seed, 0, rank])  # batch draws differ per rank; a resumed run reseeds
    device = accelerator.device
    torch.manual_seed(cfg.seed)
    embedding, head = read_token_matrices(target_path)
    if init_from is not None:
        model = load_draft(init_from, target_path, (embedding, head))
        have = {"layers": model.cfg.n_layer, "fusion": model.cfg.fusion, "draft vocabulary": model.cfg.draft_vocab,
                "MLP width": model.cfg.intermediate_size}
        want = {"layers": cfg.n_layer, "fusion": cfg.fusion, "draft vocabulary": cfg.draft_vocab,
                "MLP width": cfg.intermediate_size or model.cfg.intermediate_size}
        differ = [f"{k} {want[k]} (it has {have[k]})" for k in have if have[k] != want[k]]
        if differ:
            raise InvalidArgumentError(f"--init {init_from} cannot be trained with other {', '.join(differ)}; "
                                       "drop those options or start without --init")
    else:
        d2t = frequent_tokens(train, facts.n_vocab, cfg.draft_vocab) if cfg.draft_vocab else None
        model = DraftModel(config_for_target(facts, cfg.n_layer, cfg.fusion, cfg.draft_vocab, cfg.intermediate_size),
                           embedding, head, d2t)
    check_pairing(model.cfg, facts, str(init_from or out))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        return max(0.0, (cfg.steps - step) / max(1, cfg.steps - cfg.warmup))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    objective, opt = accelerator.prepare(_Objective(model, cfg), opt)  # DDP across processes when launched so
    start_step, history = 0, []
    source = _source_key(data_dirs, init_from)  # what the weights (and the d2t map) were built from
    if resume and (ckpt_dir / "state.pt").is_file():
        state = torch.load(ckpt_dir / "state.pt", map_location="cpu", weights_only=False)
        if state["config"] == asdict(cfg) and state.get("source") != source:
            raise InvalidArgumentError(f"{ckpt_dir} was made from other data folders or another --init; "
                                       "give the same ones to resume, or remove it to start over")
        if state["config"] != asdict(cfg):
            log.warning("%s has other training settings; starting over", ckpt_dir)
        else:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            start_step, history = state["step"], state["history"]
            rng = np.random.default_rng([cfg.seed, start_step, rank])
            log.info("resumed from %s at step %d", ckpt_dir, start_step)
    train_w, held_w = Windows(train, cfg.seq_len), Windows(held, cfg.seq_len)
    if len(train_w) == 0:
        raise InvalidArgumentError(f"no training window of --seq-len {cfg.seq_len} holds an answer token; "
                                   "raise --seq-len or generate data with longer answers")
    log.info("training on %d windows (%d sequences), %d held out", len(train_w), len(train), len(held_w))
    t0 = time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=start_step, disable=not progress or not accelerator.is_main_process, desc="train-draft")
    objective.train()
    for step in range(start_step, cfg.steps):
        idx = rng.integers(0, len(train_w), size=cfg.batch_size)
        if step == start_step:
            log.info("rank %d: first batch %s", rank, idx.tolist())
        batch = {k: v.to(device) for k, v in train_w.batch(idx).items()}
        with accelerator.autocast():
            loss, metrics = objective(batch, noise=True)
        if loss is None:  # cannot happen with the windows kept above; guards a future change
            continue
        if not bool(torch.isfinite(loss)):
            raise TrainingDivergedError(f"the loss became {loss.item()} at step {step + 1}; nothing was saved. "
                                        f"Lower --lr (now {cfg.lr:g})")
        opt.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['acc']:.2f}")
        done = step + 1
        if done % cfg.eval_every == 0 or done == cfg.steps:
            ev = evaluate(model, held_w, cfg, device)  # {} when nothing is held out
            history.append({"step": done, "train": metrics, "heldout": ev, "seconds": time.perf_counter() - t0})
            if ev:
                log.info("step %d: held-out loss %.4f, token accuracy %.3f", done, ev["loss"], ev["acc"])
        if accelerator.is_main_process and (done % cfg.checkpoint_every == 0 and done < cfg.steps):
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            state = {"config": asdict(cfg), "source": source, "step": done, "history": history,
                     "model": model.state_dict(), "optimizer": opt.state_dict(),
                     "scheduler": sched.state_dict()}
            torch.save(state, ckpt_dir / "state.tmp")
            os.replace(ckpt_dir / "state.tmp", ckpt_dir / "state.pt")
    bar.close()
    report = {"config": asdict(cfg), "data": [str(d) for d in data_dirs], "n_sequences": len(seqs),
              "n_train_tokens": int(sum(len(s[0]) for s in train)), "history": history,
              "train_seconds": time.perf_counter() - t0, "device": str(device)}
    accelerator.wait_for_everyone()
    digest = hashlib.sha256(b"".join(p.detach().float().cpu().numpy().tobytes() for p in model.parameters())).hexdigest()[:16]
    log.info("rank %d: weights digest %s", rank, digest)
    if accelerator.is_main_process:
        final = model.to("cpu", torch.float32)
        if not all(bool(torch.isfinite(p).all()) for p in final.parameters()):
            raise TrainingDivergedError(f"the weights became non-finite in training; nothing was saved. Lower --lr (now {cfg.lr:g})")
        save_draft(final, out, overwrite=overwrite, extra={"training": {k: report[k] for k in ("n_sequences", "n_train_tokens", "train_seconds")}})
        if cfg.tau_prompts > 0:
            from .evaluate import measure_tau

            report["heldout_tau"] = measure_tau(target_path, out, heldout_prompts(held, cfg.tau_prompts),
                                                max_tokens=cfg.tau_max_tokens, progress=progress)
        (out / "training_report.json").write_text(json.dumps(report, indent=1))
        if ckpt_dir.exists():
            import shutil

            shutil.rmtree(ckpt_dir, ignore_errors=True)
    return report

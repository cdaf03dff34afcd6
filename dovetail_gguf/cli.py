"""The ``dovetail`` command line: thin click shells over the API, training, bench and server."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import click

from .errors import DovetailError
from .options import LIMITS, GenerateOptions, check
from .train.config import TrainConfig

TRAIN_DEFAULTS = TrainConfig()

log = logging.getLogger("dovetail_gguf")


class _Group(click.Group):
    """Turns every DovetailError into one line on stderr and exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except DovetailError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug, llama.cpp's too).")
def main(verbose: int) -> None:
    """Dovetail: fast local LLM inference with a GGUF target on the CPU and a small draft on the GPU.

    The target model runs in llama.cpp and verifies, in one batched call, a tree
    of tokens that a small PyTorch draft model proposes. Output is lossless:
    greedy text is the target's argmax at every step and sampling keeps its
    distribution, and greedy output is bit-identical to plain decoding's
    (--no-draft) at any context length: llama.cpp runs kernels that compute a
    row the same in any batch, so a draft, a prediction or what the engine
    learned never changes an answer.
    Requests that repeat their context (edits, quotes, a --prediction) get long
    verified chains from a suffix index over the prompt and the answer.
    """
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("llama_cpp").setLevel(level)


# ---------------------------------------------------------------------- shared options
def target_options(f):
    f = click.option("-m", "--target", "target", type=click.Path(dir_okay=False), default=None,
                     help="Target: a GGUF path or a model name (smollm2-135m, qwen2.5-coder-0.5b). "
                          "Default: $DOVETAIL_TARGET, else smollm2-135m.")(f)
    f = click.option("-t", "--threads", type=click.IntRange(min=1), default=None, help="CPU threads for the target (default: physical cores).")(f)
    f = click.option("-c", "--ctx-size", "ctx_size", type=click.IntRange(min=16), default=4096, show_default=True, help="Target context length in tokens.")(f)
    f = click.option("-ngl", "--target-gpu-layers", "gpu_layers", type=click.IntRange(min=0), default=0, show_default=True,
                     help="Target layers to offload to a GPU (needs llama-cpp-python built with CUDA).")(f)
    f = click.option("--kernels", type=click.Choice(["invariant", "fast"]), default="invariant", show_default=True,
                     help="invariant: a row's logits are the same in any batch, so greedy output equals "
                          "--no-draft's and the same request gets the same answer. fast: llama.cpp's own "
                          "kernel choice per batch size (repacked weights, split attention); a near-tie of the "
                          "top two logits can then flip between runs. Measured trade-off (Qwen2.5-Coder-0.5B plain "
                          "decoding, docs/performance.md): fast is no faster, 0.99x invariant's on an AMD EPYC "
                          "with AVX2 and 0.97-1.02x on an Intel Xeon with AMX (setup.sh builds llama.cpp without "
                          "AMX code).")(f)
    f = click.option("--repack/--no-repack", "repack", default=None,
                     help="Load Q4_0, Q4_K, IQ4_NL and Q2_K weights in llama.cpp's repacked layouts (x86). "
                          "Default: on, as llama.cpp does, where they are batch-invariant (setup.sh's patched "
                          "build). Measured on a 1.5B Q4_K_M shape, 2 threads, Intel Xeon: draft trees of 4-32 rows "
                          "about twice as fast, one-token decodes alike, prompts 1.2-1.8x slower (docs/usage.md).")(f)
    return f


def draft_options(f):
    f = click.option("--draft", "draft", type=click.Path(file_okay=False), default=None,
                     help="Draft folder (config.json + model.safetensors). Default: $DOVETAIL_DRAFT, else the "
                          "shipped draft made for the target, if any.")(f)
    f = click.option("--no-draft", is_flag=True, help="No draft model: plain decoding (the baseline), or suffix-index "
                                                      "speculation alone with --ngram.")(f)
    f = click.option("--ngram/--no-ngram", "ngram", default=None,
                     help="Propose continuations of the longest earlier match of the context's tail (a suffix "
                          "index over the prompt and the answer), verified in long chains where the text repeats. "
                          "Default: on with a draft model, off without.")(f)
    f = click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True,
                     help="Where the draft runs; auto picks CUDA when present.")(f)
    f = click.option("--draft-dtype", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto",
                     show_default=True, help="The draft's weights: auto is bf16/fp16 on a GPU, fp32 on a CPU; "
                                             "bf16 makes a CPU draft step cheaper (it reads half the bytes).")(f)
    f = _limited("tree_tokens", "--tree-tokens")(f)
    f = _limited("tree_depth", "--tree-depth")(f)
    f = _limited("tree_topk", "--tree-topk")(f)
    f = click.option("--fixed-tree", is_flag=True,
                     help="Always draft the full tree and verify every candidate. By default each round verifies "
                          "what measured costs and acceptance say pays, and plain decoding where nothing does.")(f)
    return f


def _limited(name: str, *decls: str, help: str | None = None, **kw):
    """A click option whose type, default and stated range are ``LIMITS[name]``'s; the value is checked
    where GenerateOptions (or TreeConfig) is built, so the CLI's error is every surface's."""
    lim = LIMITS[name]
    text = f"{help or lim.help} Range: {lim.bounds()}."
    return click.option(*decls, type=lim.kind, default=lim.default, show_default=lim.default is not None, help=text,
                        **kw)


def sampling_options(f):
    f = _limited("max_tokens", "-n", "--max-tokens")(f)
    f = _limited("temperature", "--temperature",
                 help="0 = greedy. Sampling applies llama.cpp's chain in its order: logit bias, penalties, "
                      "top-k, top-p, min-p, then temperature.")(f)
    f = _limited("top_p", "--top-p")(f)
    f = _limited("top_k", "--top-k")(f)
    f = _limited("min_p", "--min-p")(f)
    f = _limited("repeat_penalty", "--repeat-penalty", help="Penalise tokens of the last --repeat-last-n (1 = off).")(f)
    f = _limited("repeat_last_n", "--repeat-last-n")(f)
    f = _limited("presence_penalty", "--presence-penalty")(f)
    f = _limited("frequency_penalty", "--frequency-penalty")(f)
    f = click.option("--logit-bias", multiple=True, metavar="TOKEN=BIAS",
                     help=f"Add BIAS ({LIMITS['logit_bias'].bounds()}) to token id TOKEN's logit (repeatable); "
                          "-100 keeps it out.")(f)
    f = click.option("--seed", type=int, default=None, help=LIMITS["seed"].help)(f)
    f = click.option("--stop", multiple=True, help=f"Stop string (repeatable, at most {LIMITS['stop'].hi}).")(f)
    f = click.option("--grammar", "grammar_file", type=click.Path(dir_okay=False), default=None,
                     help="A GBNF grammar file (llama.cpp's format): the output matches it.")(f)
    f = click.option("--json-schema", default=None,
                     help="A JSON Schema (inline JSON, or a file): the output is JSON that validates against it.")(f)
    return f


@dataclass
class TargetChoice:
    """What --target, --threads, --ctx-size, --target-gpu-layers, --kernels and --repack asked for."""

    target: str | None
    threads: int | None
    ctx_size: int
    gpu_layers: int
    kernels: str
    repack: bool | None

    @classmethod
    def take(cls, kw: dict) -> "TargetChoice":
        return cls(kw.pop("target"), kw.pop("threads"), kw.pop("ctx_size"), kw.pop("gpu_layers"), kw.pop("kernels"),
                   kw.pop("repack"))

    def config(self):
        from .target import TargetConfig

        return TargetConfig(n_ctx=self.ctx_size, n_threads=self.threads, n_gpu_layers=self.gpu_layers, kernels=self.kernels,
                            use_extra_buffers=self.repack)

    def path(self) -> Path:
        from .models import resolve_target

        return resolve_target(self.target)


@dataclass
class DraftChoice:
    """What the draft options asked for."""

    draft: str | None
    no_draft: bool
    ngram: bool | None
    device: str
    draft_dtype: str
    tree_tokens: int
    tree_depth: int
    tree_topk: int
    fixed_tree: bool

    @classmethod
    def take(cls, kw: dict) -> "DraftChoice":
        return cls(*(kw.pop(k) for k in ("draft", "no_draft", "ngram", "device", "draft_dtype", "tree_tokens",
                                         "tree_depth", "tree_topk", "fixed_tree")))

    def tree(self):
        from .types import TreeConfig

        tree = TreeConfig(self.tree_tokens, self.tree_depth, self.tree_topk)
        tree.validate()  # the table's bounds before any model loads; the target's own at load
        return tree

    @property
    def draft_arg(self):
        """Dovetail's ``draft`` argument: False for none, None for the default, else the folder."""
        return False if self.no_draft else self.draft


@dataclass
class SamplingChoice:
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repeat_penalty: float
    repeat_last_n: int
    presence_penalty: float
    frequency_penalty: float
    logit_bias: tuple[str, ...]
    seed: int | None
    stop: tuple[str, ...]
    grammar_file: str | None
    json_schema: str | None

    @classmethod
    def take(cls, kw: dict) -> "SamplingChoice":
        return cls(*(kw.pop(f.name) for f in dataclasses.fields(cls)))

    def options(self, **extra) -> GenerateOptions:
        """The checked GenerateOptions of these flags (and ``extra`` fields); unreadable files and
        values outside the options table raise DovetailError, before any model loads."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["stop"] = list(self.stop)
        out["logit_bias"] = dict(_bias_pair(item) for item in self.logit_bias)
        grammar_file = out.pop("grammar_file")
        out["grammar"] = _read_text(grammar_file, "grammar") if grammar_file is not None else None
        if self.json_schema is not None:
            text = self.json_schema
            out["json_schema"] = text if text.lstrip().startswith(("{", "true", "false")) else _read_text(text, "JSON schema")
        return GenerateOptions(**out, **extra)


def _bias_pair(item: str) -> tuple[int, float]:
    token, sep, bias = item.partition("=")
    try:
        if not sep:
            raise ValueError
        return int(token), float(bias)
    except ValueError:
        raise DovetailError(f"--logit-bias takes TOKEN=BIAS (a token id and a number), got {item!r}") from None


def _read_text(path: str, what: str) -> str:
    try:
        return Path(path).read_bytes().decode("utf-8", errors="replace")
    except OSError as e:
        raise DovetailError(f"cannot read the {what} file {path}: {e.strerror or e}") from None


def load_dovetail(target: TargetChoice, draft: DraftChoice, **kwargs):
    from .api import Dovetail

    return Dovetail(target.path(), draft.draft_arg, device=draft.device, draft_dtype=draft.draft_dtype, tree=draft.tree(),
                    target_config=target.config(), adaptive=not draft.fixed_tree, ngram=draft.ngram, **kwargs)


# ---------------------------------------------------------------------- info
@main.command()
@click.argument("gguf", type=click.Path(dir_okay=False))
def info(gguf: str) -> None:
    """Show what a GGUF file holds (architecture, size, quant types, shapes, chat template) and what the
    kernel probe found for it on this machine."""
    from .gguf_io import read_facts

    f = read_facts(gguf)
    quants = ", ".join(f"{k} x{v}" for k, v in f.quant_types.items())
    rows = [
        ("file", f.path), ("name", f.name), ("architecture", f.architecture),
        ("size", f"{f.file_size / 2**20:.1f} MiB"), ("tensor types", quants),
        ("n_embd", f.n_embd), ("n_layer", f.n_layer), ("n_head / n_head_kv", f"{f.n_head} / {f.n_head_kv}"),
        ("vocab", f.n_vocab), ("train context", f.n_ctx_train), ("tokenizer", f"{f.tokenizer_model} ({f.tokenizer_pre or 'default'})"),
        ("tokenizer fingerprint", f.tokenizer_fingerprint), ("LM head", "tied to embedding" if f.tied_head else "separate"),
        ("chat template", "yes" if f.has_chat_template else "no"),
    ]
    from .invariance import cached
    from .llama_runtime import physical_cores

    threads = physical_cores()
    found = cached(f, threads)
    rows.append(("kernels", f"{found.describe()} ({threads} threads)" if found else
                 f"not probed here yet for {threads} threads (the first load probes them, once)"))
    for k, v in rows:
        click.echo(f"{k:>22}: {v}")


# ---------------------------------------------------------------------- generate
@main.command()
@click.argument("prompt", required=False)
@click.option("-p", "--prompt", "prompt_option", default=None, help="The prompt, as an option (llama.cpp's -p) "
                                                                   "instead of the PROMPT argument.")
@target_options
@draft_options
@sampling_options
@click.option("--chat", is_flag=True, help="Wrap the prompt as a user message with the model's chat template.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: text, tokens, stats.")
@click.option("--prediction", "prediction_file", type=click.Path(dir_okay=False), default=None,
              help="Predicted output (OpenAI's Predicted Outputs): a text file the answer is expected to repeat, "
                   "e.g. the file being edited. Matching stretches are verified in long chains; the output is the "
                   "same with or without it.")
@click.option("--suffix", "suffix_file", type=click.Path(dir_okay=False), default=None,
              help="Fill in the middle: a text file of what follows the gap (PROMPT is what precedes it). Needs a "
                   "model with FIM tokens (e.g. --target qwen2.5-coder-0.5b).")
@click.option("--logprobs", "top_logprobs", type=int, default=None,
              help=f"With --json: each token's log-probability and this many likeliest alternatives "
                   f"({LIMITS['logprobs'].bounds()}).")
def generate(prompt: str | None, prompt_option: str | None, chat: bool, as_json: bool, prediction_file: str | None,
             suffix_file: str | None, top_logprobs: int | None, **kw) -> None:
    """Generate text after PROMPT or -p PROMPT ('-' reads it from stdin). Plain output streams as it is generated."""
    if (prompt is None) == (prompt_option is None):
        raise DovetailError("give the prompt once: as the PROMPT argument or as -p/--prompt")
    prompt = prompt if prompt is not None else prompt_option
    if prompt == "-":  # bytes that are not UTF-8 become U+FFFD rather than a crash
        prompt = sys.stdin.buffer.read().decode("utf-8", errors="replace")
    prediction = _read_text(prediction_file, "prediction") if prediction_file is not None else None
    suffix = _read_text(suffix_file, "suffix") if suffix_file is not None else None
    if suffix is not None and chat:
        raise DovetailError("--suffix fills in the middle of a file; it does not combine with --chat")
    if top_logprobs is not None and not as_json:
        raise DovetailError("--logprobs needs --json (the log-probabilities are part of its output)")
    options = SamplingChoice.take(kw).options(prediction=prediction, logprobs=top_logprobs)
    dt = load_dovetail(TargetChoice.take(kw), DraftChoice.take(kw))
    if suffix is not None:
        tokens = dt.infill_tokens(prompt, suffix, max_tokens=options.max_tokens)
    elif chat:
        tokens = dt.chat_prompt_tokens([{"role": "user", "content": prompt}])
    else:
        tokens = dt.tokenize_prompt(prompt)
    if as_json:
        result = dt.generate_tokens(tokens, options=options)
        out = {"text": result.text, "tokens": result.tokens, "finish_reason": result.finish_reason,
               "stats": result.stats.to_dict()}
        if result.logprobs is not None:
            out["logprobs"] = [{"token": r.token, "logprob": r.logprob, "top": [list(a) for a in r.top]}
                               for r in result.logprobs]
        click.echo(json.dumps(out))
    else:
        stream = dt.stream_tokens(tokens, options=options)
        for piece in stream:
            click.echo(piece, nl=False)
        click.echo()
        result = stream.result
        s = result.stats
        log.info("%d tokens, %.1f tok/s, tau %.2f over %d rounds", s.n_tokens, s.tokens_per_second,
                 s.mean_accepted_tokens, s.rounds)
        if prediction is not None:
            log.info("prediction: %d tokens accepted, %d rejected", s.accepted_prediction_tokens,
                     s.rejected_prediction_tokens)
    if result.finish_reason == "context_full":
        raise DovetailError(f"the context filled up after {result.stats.n_tokens} new tokens "
                            f"(n_ctx {dt.target.n_ctx}); raise --ctx-size or lower --max-tokens")


# ---------------------------------------------------------------------- chat
@main.command()
@target_options
@draft_options
@sampling_options
@click.option("--system", default=None, help="A system message to start the chat with.")
def chat(system: str | None, **kw) -> None:
    """Interactive chat in the terminal. /reset clears the history, /stats shows speed, /quit leaves.

    Ctrl-C stops the current answer and keeps the session.
    """
    options = SamplingChoice.take(kw).options()
    dt = load_dovetail(TargetChoice.take(kw), DraftChoice.take(kw))
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    last = None
    click.echo("dovetail chat: /reset, /stats, /quit", err=True)
    while True:
        try:
            line = click.prompt(">", prompt_suffix=" ", default="", show_default=False)
        except (EOFError, click.Abort):
            click.echo()
            return
        cmd = line.strip()
        if not cmd:
            continue
        if cmd in ("/quit", "/exit"):
            return
        if cmd == "/reset":
            history = list(start)
            click.echo("(history cleared)", err=True)
            continue
        if cmd == "/stats":
            click.echo(json.dumps(last.stats.to_dict(), indent=1) if last else "(no answer yet)", err=True)
            continue
        try:  # a message that cannot be answered is refused; the session goes on
            fitted = fit_history(dt, history + [{"role": "user", "content": line}], len(start), options.max_tokens)
            if fitted is None:
                raise DovetailError("that message alone does not fit the context; send a shorter one")
            if len(fitted) < len(history) + 1:
                click.echo(f"(the oldest {(len(history) + 1 - len(fitted)) // 2} turn(s) left the context)", err=True)
            stream = dt.chat(fitted, stream=True, options=options)
        except DovetailError as e:
            click.echo(f"error: {e}", err=True)
            continue
        history = fitted
        try:
            for piece in stream:
                click.echo(piece, nl=False)
        except KeyboardInterrupt:
            stream.close()
            click.echo(" [stopped]", err=True)
        click.echo()
        last = stream.result
        if last is not None:
            history.append({"role": "assistant", "content": last.text})
        else:
            history.pop()


def fit_history(dt, history: list[dict], n_fixed: int, max_tokens: int) -> list[dict] | None:
    """``history`` without its oldest turns (the first ``n_fixed`` messages kept) until the prompt leaves
    room for an answer; None if even the last message alone does not fit."""
    room = dt.target.n_ctx - min(max_tokens, dt.target.n_ctx // 2)
    while True:
        if len(dt.chat_prompt_tokens(history)) <= room:
            return history
        if len(history) - n_fixed <= 1:
            return None
        history = history[:n_fixed] + history[n_fixed + 2:]  # drop the oldest user/assistant pair


# ---------------------------------------------------------------------- draft
@main.group()
def draft() -> None:
    """Create and inspect draft models."""


@draft.command("init")
@click.option("-m", "--target", "target", type=click.Path(dir_okay=False), default=None, help="Target GGUF or model name the draft is for (default: the default target).")
@click.option("-o", "--output", "output", type=click.Path(file_okay=False), required=True, help="Folder to write (config.json + model.safetensors).")
@click.option("--layers", type=click.IntRange(1, 64), default=TRAIN_DEFAULTS.n_layer, show_default=True,
              help="Decoder layers (Dovetail's paper uses a deep draft; EAGLE uses 1).")
@click.option("--fusion", type=click.Choice(["dgf", "fc"]), default="dgf", show_default=True, help="DGF (Dovetail) or EAGLE's fc fusion.")
@click.option("--draft-vocab", type=click.IntRange(min=1), default=None, help="Reduced draft vocabulary size (default: the target's).")
@click.option("--intermediate-size", type=click.IntRange(min=1), default=None,
              help="The draft's MLP width (default: the target's). Slimmer is cheaper on a CPU.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing draft folder (never any other folder).")
def draft_init(target, output, layers, fusion, draft_vocab, intermediate_size, seed, force) -> None:
    """Write an untrained draft for a target; training starts from it."""
    from .draft.io import check_draft_output, init_draft, save_draft
    from .models import resolve_target

    check_draft_output(output, force)  # before any work
    model = init_draft(resolve_target(target), n_layer=layers, fusion=fusion, draft_vocab=draft_vocab, seed=seed,
                       intermediate_size=intermediate_size)
    out = save_draft(model, output, overwrite=force)
    n_params = sum(p.numel() for p in model.parameters())
    click.echo(f"wrote {out}: {layers} layers, {fusion} fusion, {n_params / 1e6:.1f}M parameters")


# ---------------------------------------------------------------------- training
@main.group()
def data() -> None:
    """Build training data for a draft."""


@data.command("prompts")
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True, help="JSONL file to write.")
@click.option("--code", "n_code", type=click.IntRange(min=0), default=1500, show_default=True, help="Completion prompts from the Python standard library.")
@click.option("--chat", "n_chat", type=click.IntRange(min=0), default=500, show_default=True, help="Chat instructions from built-in templates.")
@click.option("--doctest", "n_doctest", type=click.IntRange(min=0), default=0, show_default=True,
              help="HumanEval-shaped prompts: functions whose docstring examples call them, from the standard library and installed packages.")
@click.option("--requests", "n_requests", type=click.IntRange(min=0), default=0, show_default=True,
              help="Chat coding requests ('Write a Python function `f(x)` that ...') from documented standard-library functions.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
def data_prompts(output, n_code, n_chat, n_doctest, n_requests, seed, force) -> None:
    """Write a prompt file from this machine's own text (no download, nothing from HumanEval)."""
    from .outputs import check_output_file
    from .train.prompts import write_prompt_file

    check_output_file(output, force)
    path, counts = write_prompt_file(output, n_code, n_chat, seed, n_doctest=n_doctest, n_requests=n_requests)
    asked = {"code": n_code, "chat": n_chat, "doctest": n_doctest, "requests": n_requests}
    short = [f"{k} {counts[k]} of {asked[k]}" for k in asked if counts[k] < asked[k]]
    click.echo(f"wrote {path}: {sum(counts.values())} prompts ({', '.join(f'{k} {v}' for k, v in counts.items())})")
    if short:
        click.echo(f"warning: fewer prompts than asked, all this machine's sources hold: {', '.join(short)}", err=True)


@data.command("generate")
@click.argument("prompts", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(file_okay=False), required=True, help="Folder for the shards (resumes if it exists).")
@click.option("-m", "--target", "target", type=click.Path(dir_okay=False), default=None, help="Target GGUF or model name (default: the default target).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--max-prompt-tokens", type=click.IntRange(min=1), default=768, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True,
              help=f"0: greedy answers. Range: {LIMITS['temperature'].bounds()}.")
@click.option("--batch-size", type=click.IntRange(1, 63), default=8, show_default=True, help="Sequences per llama_decode.")
@click.option("-t", "--threads", type=click.IntRange(min=1), default=None)
def data_generate(prompts, output, target, max_new_tokens, max_prompt_tokens, temperature, batch_size, threads) -> None:
    """Self-distillation: the target answers PROMPTS (JSONL or a text file); shards keep its hidden states."""
    from .models import resolve_target
    from .train.data import DataConfig, generate_data

    cfg = DataConfig(max_new_tokens=max_new_tokens, max_prompt_tokens=max_prompt_tokens, temperature=temperature,
                     batch_size=batch_size, n_threads=threads)
    out = generate_data(resolve_target(target), prompts, output, cfg)
    click.echo(f"wrote {out}")


@main.command("train-draft")
@click.argument("data_dirs", metavar="DATA_DIR...", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("-o", "--output", type=click.Path(file_okay=False), required=True, help="Folder for the trained draft.")
@click.option("-m", "--target", "target", type=click.Path(dir_okay=False), default=None, help="Target GGUF or model name (default: the default target).")
@click.option("--init", "init_from", type=click.Path(file_okay=False), default=None, help="Start from this draft instead of a fresh one.")
@click.option("--layers", type=click.IntRange(1, 64), default=TRAIN_DEFAULTS.n_layer, show_default=True, help="Decoder layers.")
@click.option("--fusion", type=click.Choice(["dgf", "fc"]), default=TRAIN_DEFAULTS.fusion, show_default=True)
@click.option("--draft-vocab", type=click.IntRange(min=0), default=TRAIN_DEFAULTS.draft_vocab or 0, show_default=True,
              help="Reduced vocabulary (0: the target's full one).")
@click.option("--intermediate-size", type=click.IntRange(min=1), default=None,
              help="The draft's MLP width (default: the target's). Slimmer is cheaper on a CPU.")
@click.option("--steps", type=click.IntRange(min=1), default=TRAIN_DEFAULTS.steps, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=TRAIN_DEFAULTS.batch_size, show_default=True)
@click.option("--seq-len", type=click.IntRange(min=4), default=TRAIN_DEFAULTS.seq_len, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=TRAIN_DEFAULTS.lr, show_default=True)
@click.option("--warmup", type=click.IntRange(min=1), default=TRAIN_DEFAULTS.warmup, show_default=True, help="Warm-up steps.")
@click.option("--weight-decay", type=click.FloatRange(min=0), default=TRAIN_DEFAULTS.weight_decay, show_default=True)
@click.option("--unroll", type=click.IntRange(1, 8), default=TRAIN_DEFAULTS.unroll, show_default=True,
              help="Passes per step, each on the draft's own previous predictions (training-time test); 1 = teacher forcing only.")
@click.option("--tau-prompts", type=click.IntRange(min=0), default=TRAIN_DEFAULTS.tau_prompts, show_default=True,
              help="Held-out prompts on which to measure τ through the engine at the end (0: skip).")
@click.option("--seed", type=int, default=TRAIN_DEFAULTS.seed, show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing draft folder (never any other folder).")
def train_draft_cmd(data_dirs, output, target, init_from, layers, fusion, draft_vocab, intermediate_size, steps,
                    batch_size, seq_len, lr,
                    warmup, weight_decay, unroll, tau_prompts, seed, force) -> None:
    """Train a draft on one or more DATA_DIR folders (from `dovetail data generate`); resumes from its checkpoint.

    With --init, the draft's shape (layers, fusion, draft vocabulary, MLP width) is the init draft's; giving
    another one is an error.
    """
    from .draft.io import read_config
    from .models import resolve_target
    from .train.trainer import train_draft

    if init_from is not None:  # the shape comes from the init draft unless asked for explicitly
        ctx = click.get_current_context()
        init_cfg = read_config(init_from)
        given = lambda name: ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE  # noqa: E731
        layers = layers if given("layers") else init_cfg.n_layer
        fusion = fusion if given("fusion") else init_cfg.fusion
        draft_vocab = draft_vocab if given("draft_vocab") else (init_cfg.draft_vocab or 0)
        intermediate_size = intermediate_size if given("intermediate_size") else init_cfg.intermediate_size

    cfg = TrainConfig(n_layer=layers, fusion=fusion, draft_vocab=draft_vocab or None,
                      intermediate_size=intermediate_size, steps=steps, batch_size=batch_size,
                      seq_len=seq_len, lr=lr, warmup=warmup, weight_decay=weight_decay, unroll=unroll,
                      tau_prompts=tau_prompts, seed=seed)
    report = train_draft(resolve_target(target), data_dirs, output, cfg, init_from=init_from, overwrite=force)
    last = report["history"][-1]["heldout"] if report["history"] else {}
    line = f"wrote {output}: held-out loss {last.get('loss', float('nan')):.4f}, token accuracy {last.get('acc', float('nan')):.3f}"
    if "heldout_tau" in report:
        line += f", τ {report['heldout_tau']['tau']:.2f} on {report['heldout_tau']['n_prompts']} held-out prompts"
    click.echo(line)


# ---------------------------------------------------------------------- bench
@main.command()
@target_options
@draft_options
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False), default=None, help="JSONL with 'prompt' fields (default: HumanEval).")
@click.option("--n", "n_prompts", type=click.IntRange(min=1), default=20, show_default=True, help="Number of prompts.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--chat", is_flag=True, help="Send each prompt as a user message, rendered with the model's chat template.")
@click.option("--repeats", type=click.IntRange(min=1), default=1, show_default=True,
              help="Runs of each system on each prompt, interleaved; the fastest counts (steadier medians on a busy machine).")
@click.option("--systems", default="plain,prompt-lookup,ngram,dovetail", show_default=True,
              help="Comma-separated systems to compare: plain (required; with --kernels' setting), plain-fast "
                   "(plain with --kernels fast), llama-cpp-python (its plain decoding), prompt-lookup (llama-cpp-python's), "
                   "llama-server:ngram-mod, llama-server:ngram-map-k4v, llama-server:ngram-simple (llama.cpp's "
                   "server with its own n-gram self-speculation, docs/speculative.md's settings; built once into "
                   "the cache folder on first use, about 10 minutes, needs cmake), "
                   "ngram (this engine, suffix index only), dovetail, dovetail-predicted (dovetail given plain's "
                   "answer as its predicted output). Speculative systems are also compared with a replay bound: "
                   "a policy that knows how much of each round's candidates will be accepted.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="Write every raw figure here.")
@click.option("--plot", "plot_out", type=click.Path(dir_okay=False), default=None, help="Write a PNG: tokens/s per system, τ vs speedup.")
@click.option("--force", is_flag=True, help="Overwrite existing --json / --plot files.")
def bench(prompts_file, n_prompts, max_tokens, chat, repeats, systems, json_out, plot_out, force, **kw) -> None:
    """Compare plain llama.cpp decoding, prompt lookup, suffix-index speculation and Dovetail on the same GGUF (greedy).

    Systems run interleaved per prompt; speedups are medians of per-prompt ratios against plain decoding
    in the same run, prefill excluded for every system.
    """
    from .bench import DOVETAIL, PREDICTED, SYSTEMS, file_prompts, format_table, humaneval_prompts, plot, run_bench
    from .outputs import check_output_file

    for out in (json_out, plot_out):  # before the run, not after it
        if out is not None:
            check_output_file(out, force)
    if json_out and plot_out and Path(json_out).resolve() == Path(plot_out).resolve():
        raise DovetailError("--json and --plot name the same file")
    if plot_out:  # matplotlib (the [bench] extra): missing is an error now, not after the run
        from .extras import require

        require("matplotlib", "--plot")
    target, draft = TargetChoice.take(kw), DraftChoice.take(kw)
    chosen = tuple(s.strip() for s in systems.split(",") if s.strip())
    if set(chosen) - set(SYSTEMS) or "plain" not in chosen:
        raise DovetailError(f"--systems takes {', '.join(SYSTEMS)} (plain required); got {systems!r}")
    if draft.no_draft:
        chosen = tuple(s for s in chosen if s not in (DOVETAIL, PREDICTED))
    prompts = file_prompts(prompts_file, n_prompts) if prompts_file else humaneval_prompts(n_prompts)
    report = run_bench(prompts, target.path(), draft.draft, max_tokens=max_tokens, threads=target.threads,
                       device=draft.device, draft_dtype=draft.draft_dtype, tree=draft.tree(), n_ctx=target.ctx_size, systems=chosen,
                       adaptive=not draft.fixed_tree, chat=chat, ngram=draft.ngram, kernels=target.kernels, repeats=repeats,
                       repack=target.repack)
    report["settings"]["prompts"] = Path(prompts_file).name if prompts_file else "humaneval"
    click.echo(format_table(report["summary"]))
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(report, indent=1))
    if plot_out:
        plot(report, plot_out)


# ---------------------------------------------------------------------- serve
@main.command()
@target_options
@draft_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind; anything but loopback must be asked for.")
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True)
@click.option("--api-key", default=None, envvar="DOVETAIL_API_KEY", help="Require 'Authorization: Bearer KEY' (or set DOVETAIL_API_KEY).")
@_limited("served_max_tokens", "-n", "--max-tokens", "default_max_tokens")
@_limited("max_queue", "--max-queue")
@click.option("--cors", "cors_origins", multiple=True, metavar="ORIGIN",
              help="Let web pages from ORIGIN (e.g. http://localhost:3000; '*' for any) call the API from a "
                   "browser (repeatable). Off by default.")
@_limited("parallel", "--parallel", "-np")
@_limited("cache_slots", "--cache-slots")
@_limited("cache_ram_mib", "--cache-ram", "cache_ram_mib")
@click.option("--embedding-model", default=None, metavar="GGUF",
              help="A GGUF for /v1/embeddings and /api/embed (an embedding model), in a context of its own. "
                   "Default: the target's own weights, mean-pooled unless the GGUF declares a pooling.")
def serve(host, port, api_key, default_max_tokens, max_queue, cors_origins, parallel, cache_slots, cache_ram_mib,
          embedding_model, **kw) -> None:
    """A local server with three surfaces on one port: OpenAI's (/v1/chat/completions, /v1/completions,
    /v1/embeddings, /v1/models), Ollama's (/api/chat, /api/generate, /api/embed, /api/tags, /api/show,
    /api/ps, /api/version) and llama.cpp's (/infill, /tokenize, /detokenize, /metrics), plus /health.

    Up to --parallel requests are generated side by side, a round of each in turn; the rest wait in a
    FIFO queue of at most --max-queue. Besides the
    prompt in the KV cache, --cache-slots others (conversations, files) are kept warm in RAM.
    """
    import uvicorn

    from .server import create_app

    if api_key is None and os.environ.get("DOVETAIL_API_KEY") is not None:  # click reads an empty variable as unset
        api_key = os.environ["DOVETAIL_API_KEY"]
    if api_key is not None and not api_key.strip():
        raise DovetailError("the API key is empty; give a real key, or leave --api-key and DOVETAIL_API_KEY unset")
    default_max_tokens, max_queue = check("served_max_tokens", default_max_tokens), check("max_queue", max_queue)
    target = TargetChoice.take(kw)
    cache_slots, cache_ram_mib = check("cache_slots", cache_slots), check("cache_ram_mib", cache_ram_mib)
    dt = load_dovetail(target, DraftChoice.take(kw), cache_slots=cache_slots, cache_ram_mib=cache_ram_mib,
                       parallel=check("parallel", parallel))
    embedder = None
    if embedding_model is not None:
        from .embed import Embedder
        from .models import resolve_target

        embedder = Embedder.load(resolve_target(embedding_model), n_threads=dt.target.n_threads)
    name = dt.target.path.stem
    app = create_app(dt, name, api_key=api_key, default_max_tokens=default_max_tokens, max_queue=max_queue,
                     cors_origins=cors_origins, embedder=embedder)
    click.echo(f"serving {name} on http://{host}:{port}/v1 (draft: {'yes' if dt.drafter else 'no'})", err=True)
    # Ctrl-C: open streams get 2 s to end, then their tasks are cancelled, which stops their generations
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=2)


# ---------------------------------------------------------------------- convert
@main.command("convert")
@click.argument("src", type=click.Path())
@click.option("-o", "--output", "out", type=click.Path(dir_okay=False), required=True, help="GGUF file to write.")
@click.option("--outtype", default="f16", show_default=True,
              help="f32, f16, bf16, q8_0 (written directly) or q4_0, q4_k_m, q5_k_m, q6_k (llama.cpp's quantizer).")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
def convert_cmd(src, out, outtype, force) -> None:
    """Convert a LLaMA/Mistral checkpoint folder (HF or Meta layout) to GGUF."""
    from convert.hf import convert

    path = convert(src, out, outtype, force=force)
    click.echo(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")

"""`python -m tools.generate CHECKPOINT --prompt TEXT [...]`: sample text from a foldtron checkpoint, to read what a
model writes.

Everything comes from the checkpoint: the model (the run's resolved config, saved in its meta.json), the
weights' layout and the tokenizer of the run. CHECKPOINT is a step_* folder or a checkpoint.dir (its latest).
Each prompt is printed with its continuations; `--json` prints one JSON document instead (the prompts, the
completions' text and token ids, whether each stopped, tokens/s). A row stops at the tokenizer's
end-of-document id (and at `--stop` / `--stop-id`), else after `--max-new-tokens`; ids beyond the tokenizer's
vocabulary (the padding of the model's) are never drawn, the thought delimiters of RLP (`think_ids`) excepted.

Layouts. The weights are read with the tensor/expert layout they were written with (a layout-free checkpoint
format is not there yet), so a checkpoint of tensor=T (and, for an MoE, expert=E, expert_tensor=X) runs on
lcm(T, E x X) ranks under torchrun, gloo on the CPU or NCCL on GPUs; any other world size is refused with the
command to run. Data and context parallelism of the training run do not matter (generation runs without CP);
a checkpoint split over pipeline stages is refused (generation runs without PP). Every rank works, rank 0
prints. Several data-parallel replicas (an MoE whose expert group is larger than T) all sample every prompt,
the same way: they are there only because the experts' all-to-all needs every rank of its group.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import sys

import torch

from data.tokenizers import TokenizerError, build_tokenizer
from parallel.topology import Sizes, Topology
from pretrain import checkpoint, distributed
from pretrain.checkpoint import CheckpointError
from pretrain.cli import ArgumentParser, UsageError, parse_command, run_tool
from pretrain.config import Config, ConfigError
from pretrain.config_loading import config_from_dict
from pretrain.generation import GenerationError, Sampling, generate
from pretrain.model import GPT

PROGRAM = "generate"
EPILOG = """\
prompts:
  --prompt TEXT, repeated for several prompts, and/or --prompts-file FILE: a JSON Lines file, one object per
  line with a "prompt" string (other fields are ignored, blank lines skipped), for example
    {"prompt": "def main():\\n    "}
  A prompt must not be empty: the model continues text. Its text is encoded as it is (no end-of-document
  id is put in front).

sampling:
  --temperature 0 is greedy (the most likely token every step: always the same text). Otherwise the next
  token is drawn from softmax(logits / T), restricted to the most likely tokens holding --top-p of the
  probability, from a random stream seeded by --seed (default: a fresh seed, printed, so that a text can
  be drawn again). --samples K draws K continuations of each prompt (its prompt is computed once).
  --stop TEXT stops a row at that text, which must be one token (\\n and \\t are read as a newline and a
  tab); --stop-id N at a token id. The stop token is kept at the end of the completion.

precision:
  The run's precision.dtype (fp32, or bf16 autocast). A checkpoint of an FP8 run (precision.fp8.enabled)
  generates in bf16: its weights are stored in full precision, and generation does not build FP8 layers.

ranks:
  A checkpoint written with tensor=T (and for an MoE expert=E, expert_tensor=X) runs on lcm(T, E x X) ranks:
    torchrun --nproc-per-node 2 -m tools.generate CHECKPOINT --prompt "..."
  Pipeline-parallel checkpoints are refused; data and context parallelism of the run do not matter.
"""


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=f"python -m tools.{PROGRAM}", epilog=EPILOG,
                       description="Sample text from a foldtron checkpoint with its run's model and tokenizer.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a step_* checkpoint folder, or a checkpoint.dir (its latest checkpoint)")
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt (repeatable)")
    p.add_argument("--prompts-file", metavar="FILE", help='JSON Lines, one {"prompt": "..."} per line')
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="per continuation (default: 64)")
    p.add_argument("--temperature", type=float, default=0.8, metavar="T", help="0: greedy (default: 0.8)")
    p.add_argument("--top-p", type=float, default=0.95, metavar="P", help="nucleus sampling (default: 0.95)")
    p.add_argument("--seed", type=int, metavar="S", help="the random stream of sampling (default: a fresh one)")
    p.add_argument("--samples", type=int, default=1, metavar="K", help="continuations per prompt (default: 1)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop at this one-token text")
    p.add_argument("--stop-id", action="append", default=[], type=int, metavar="ID", help="stop at this token id")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda when available")
    p.add_argument("--tokenizer-path", metavar="PATH",
                   help="the run's tokenizer file, where it is not where the run's data.tokenizer_path says")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if not args.prompt and not args.prompts_file:
        raise UsageError("no prompt: pass --prompt TEXT (repeatable) or --prompts-file FILE")
    if args.samples < 1:
        raise UsageError(f"--samples {args.samples}: draw at least one continuation per prompt")
    if args.seed is not None and not 0 <= args.seed < 2**63:
        raise UsageError(f"--seed {args.seed}: must be in 0 .. 2**63 - 1")
    return args


# ----------------------------------------------------------------------------- the checkpoint and its run


def open_checkpoint(path: str) -> tuple[str, dict, Config]:
    """The checkpoint folder `path` names, its meta and the run's config."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or folder")
    folder = checkpoint.resolve_init(path, label=path)
    meta = checkpoint.read_meta(folder)
    if not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{folder}: its meta.json holds no config (written by an older foldtron): the model "
                              "it holds cannot be rebuilt")
    try:
        cfg = config_from_dict(meta["config"])
    except ConfigError as err:
        raise CheckpointError(f"{folder}: its saved config does not load here ({err})") from None
    if cfg.model.vocab_size is None:
        raise CheckpointError(f"{folder}: its saved config has no model.vocab_size (not a resolved config)")
    return folder, meta, cfg


def ranks(n: int) -> str:
    return f"{n} rank" if n == 1 else f"{n} ranks"


def generation_sizes(world: int) -> Sizes:
    """The layout to generate on: tensor parallelism over every rank (an MoE's experts too: ETP = TP, EP 1), no
    PP, CP or DP. Checkpoints are layout-free, so any number of ranks that divides the model's heads and
    widths reads any checkpoint."""
    sizes = Sizes(world=world, tp=world, ep=1, etp=world, order="tp-cp-ep-dp-pp", sp=False)
    sizes.check()
    return sizes


def generation_config(cfg: Config, sizes: Sizes, device: str) -> Config:
    """The run's config as generation uses it: this layout and device, the backend that fits the device, torch's
    norm (apex's fused one, if the run chose it, is not needed to sample), and no FP8 layers (bf16 instead)."""
    p, m, prec = cfg.parallel, cfg.model, cfg.precision
    dtype = "bf16" if prec.fp8.enabled else prec.dtype
    return dataclasses.replace(
        cfg, run=dataclasses.replace(cfg.run, device=device),
        model=dataclasses.replace(m, norm_impl="torch", recompute="none"),
        parallel=dataclasses.replace(p, tensor=sizes.tp, context=1, pipeline=1, virtual_pipeline=None,
                                     expert=sizes.ep, expert_tensor=sizes.etp, sequence_parallel=sizes.sp,
                                     backend="auto"),
        precision=dataclasses.replace(prec, dtype=dtype, fp8=dataclasses.replace(prec.fp8, enabled=False)),
    )


def tokenizer_candidates(path: str, cfg: Config, folder: str) -> list[str]:
    """Where a tokenizer file of the run may be: an absolute path as it is; a relative one from the folder the
    run was started in (where its relative checkpoint.dir leads to this checkpoint), then from here."""
    if os.path.isabs(path):
        return [path]
    candidates = []
    saved_dir = os.path.normpath(cfg.checkpoint.dir or "")
    if saved_dir and not os.path.isabs(saved_dir) and ".." not in saved_dir.split(os.sep):
        here = os.path.dirname(os.path.abspath(folder)).split(os.sep)
        tail = saved_dir.split(os.sep)
        if here[-len(tail):] == tail:
            candidates.append(os.path.join(os.sep.join(here[:-len(tail)]) or os.sep, path))
    candidates.append(os.path.abspath(path))
    return list(dict.fromkeys(candidates))


def load_tokenizer(cfg: Config, folder: str, override: str | None):
    d = cfg.data
    path = override or d.tokenizer_path
    if d.tokenizer != "byte" and path and not override:
        found = [c for c in tokenizer_candidates(path, cfg, folder) if os.path.isfile(c)]
        if not found:
            raise TokenizerError(f"the run's tokenizer, data.tokenizer_path={path!r} ({d.tokenizer}), is not at "
                                 f"{' or '.join(tokenizer_candidates(path, cfg, folder))}: pass --tokenizer-path")
        path = found[0]
    tokenizer = build_tokenizer(d.tokenizer, path, ("data.tokenizer (of the run)", "--tokenizer-path"))
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise TokenizerError(f"the tokenizer {path} has {tokenizer.vocab_size} ids, more than the model's "
                             f"{cfg.model.vocab_size}: it is not the run's tokenizer")
    return tokenizer


def vocab_limit(tokenizer, model_vocab: int) -> int:
    """The ids that may be drawn: the tokenizer's, and the think ids beyond them (the byte tokenizer's 258, 259)."""
    limit = max([tokenizer.vocab_size] + [i + 1 for i in tokenizer.think_ids or ()])
    return min(limit, model_vocab)


# ----------------------------------------------------------------------------- prompts and sampling


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        with open(args.prompts_file, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"--prompts-file {args.prompts_file} line {number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise GenerationError(f"{where}: not JSON ({err.msg}); write one {{\"prompt\": \"...\"}} object "
                                          "per line") from None
                if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                    raise GenerationError(f"{where}: no \"prompt\" string; write one {{\"prompt\": \"...\"}} object "
                                          "per line")
                prompts.append(record["prompt"])
    if not prompts:
        raise GenerationError(f"--prompts-file {args.prompts_file}: holds no prompt")
    return prompts


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    encoded = []
    for number, text in enumerate(prompts, start=1):
        if not text:
            raise GenerationError(f"prompt {number} is empty: give each prompt some text to continue")
        ids = [int(i) for i in tokenizer.encode(text)]
        if not ids:
            raise GenerationError(f"prompt {number} ({text[:40]!r}) encodes to no tokens")
        encoded.append(ids)
    return encoded


SAMPLING_FLAGS = {"max_new_tokens": "--max-new-tokens", "temperature": "--temperature", "top_p": "--top-p"}


def unescape(text: str) -> str:
    return text.replace("\\\\", "\0").replace("\\n", "\n").replace("\\t", "\t").replace("\0", "\\")


def sampling_of(args: argparse.Namespace, tokenizer, model_vocab: int) -> Sampling:
    """The sampling settings of the flags, checked; errors name the flags."""
    stops = [tokenizer.eod]
    for text in args.stop:
        ids = [int(i) for i in tokenizer.encode(unescape(text))]
        if len(ids) != 1:
            raise GenerationError(f"--stop {text!r} is {len(ids)} tokens ({' '.join(map(str, ids))}) of this "
                                  "tokenizer: a stop must be one token; use --stop-id for an id")
        stops += ids
    for i in args.stop_id:
        if not 0 <= i < model_vocab:
            raise GenerationError(f"--stop-id {i}: the model's ids are 0-{model_vocab - 1}")
        stops.append(i)
    sampling = Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                        stop_ids=tuple(dict.fromkeys(stops)), vocab_limit=vocab_limit(tokenizer, model_vocab))
    try:
        sampling.check()
    except GenerationError as err:  # "max_new_tokens=0: ..." -> "--max-new-tokens 0: ..."
        field, _, rest = str(err).partition("=")
        raise GenerationError(f"{SAMPLING_FLAGS[field]} {rest}" if field in SAMPLING_FLAGS else str(err)) from None
    return sampling


def agreed_seed(seed: int | None, device: torch.device) -> int:
    """The seed of sampling, the same on every rank: the flag's, or a fresh one drawn by rank 0."""
    if seed is not None:
        return seed
    value = torch.tensor([random.SystemRandom().randrange(2**31)], device=device)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.broadcast(value, src=0)
    return int(value.item())


# ----------------------------------------------------------------------------- the run


def load_model(cfg: Config, topology: Topology, device: torch.device, folder: str) -> GPT:
    model = GPT(cfg.model, cfg.model.vocab_size, topology).to(device)
    checkpoint.load_weights(folder, model=model, label=folder)
    return model


def autocast_of(cfg: Config, device: torch.device):
    if cfg.precision.dtype == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def completion_text(tokenizer, prompt: list[int], completion: list[int]) -> str:
    """The completion's text as it continues the prompt's (a tokenizer may decode a piece alone otherwise: a
    SentencePiece piece loses its leading space at the start of a text)."""
    before, whole = tokenizer.decode(prompt), tokenizer.decode(prompt + completion)
    return whole[len(before):] if whole.startswith(before) else tokenizer.decode(completion)


def sample_all(args: argparse.Namespace, world: int, rank: int):
    """Every step from the arguments to the report (the same on every rank); returns it and the tokenizer."""
    folder, meta, cfg = open_checkpoint(args.checkpoint)
    sizes = generation_sizes(world)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise GenerationError("--device cuda: no CUDA device is available here; use --device auto or cpu")
    trained_fp8 = cfg.precision.fp8.enabled
    cfg = generation_config(cfg, sizes, args.device)
    try:
        cfg.validate(world)
    except ConfigError as err:  # "model.num_attention_heads=4 is not divisible by parallel.tensor=3: ..."
        raise GenerationError(f"{folder} cannot be split over {ranks(world)} (generation runs tensor-parallel over "
                              f"all of them): {err}; run on another number of ranks") from None
    tokenizer = load_tokenizer(cfg, folder, args.tokenizer_path)
    prompts = read_prompts(args)
    encoded = encode_prompts(tokenizer, prompts)
    sampling = sampling_of(args, tokenizer, cfg.model.vocab_size)
    device = distributed.setup(cfg, world, rank)
    topology = (Topology.build(sizes, rank, timeout=distributed.collective_timeout(cfg)) if world > 1
                else Topology.single())
    model = load_model(cfg, topology, device, folder)
    seed = agreed_seed(args.seed, device)
    generator = torch.Generator(device=device).manual_seed(seed)
    out = generate(model, encoded, sampling, generator=generator, pad_id=tokenizer.pad or 0,
                   share_prefill=args.samples, autocast=autocast_of(cfg, device))
    samples = []
    for row, tokens in enumerate(out.tokens):
        index = row // args.samples
        samples.append({"prompt_index": index, "sample": row % args.samples, "prompt": prompts[index],
                        "prompt_ids": encoded[index], "completion": completion_text(tokenizer, encoded[index], tokens),
                        "completion_ids": tokens, "stopped": out.stopped[row]})
    report = {
        "checkpoint": folder, "step": meta["step"], "parameters": model.num_parameters(),
        "tokenizer": tokenizer.name, "eod": tokenizer.eod, "device": str(device), "world_size": world,
        "precision": cfg.precision.dtype, "trained_fp8": trained_fp8, "seq_length": cfg.model.seq_length,
        "sampling": {"max_new_tokens": sampling.max_new_tokens, "temperature": sampling.temperature,
                     "top_p": sampling.top_p, "stop_ids": list(sampling.stop_ids), "vocab_limit": sampling.vocab_limit,
                     "samples": args.samples, "seed": seed},
        "samples": samples, "new_tokens": out.new_tokens, "steps": out.steps, "seconds": out.seconds,
        "tokens_per_second": out.new_tokens / out.seconds if out.seconds > 0 else None,
    }
    return report, tokenizer


# ----------------------------------------------------------------------------- what is printed


def stop_reason(record: dict, report: dict, decode) -> str:
    if not record["stopped"]:
        return "reached --max-new-tokens"
    last = record["completion_ids"][-1]
    return "stopped at the end of the document" if last == report["eod"] else f"stopped at {decode([last])!r}"


def text_report(report: dict, decode) -> str:
    s = report["sampling"]
    precision = report["precision"] + (" (the run trained in FP8; generation runs in bf16)"
                                       if report["trained_fp8"] else "")
    where = report["device"] if report["world_size"] == 1 else f"{report['world_size']} ranks ({report['device']})"
    how = ("greedy" if s["temperature"] == 0 else f"temperature {s['temperature']:g}, top-p {s['top_p']:g}, "
           f"seed {s['seed']}")
    lines = [f"checkpoint {report['checkpoint']} (step {report['step']}, {report['parameters']:,} parameters, "
             f"{report['tokenizer']} tokenizer) on {where}, {precision}",
             f"sampling: {how}; at most {s['max_new_tokens']} new tokens, {s['samples']} per prompt"]
    for record in report["samples"]:
        if record["sample"] == 0:
            lines += ["", f"=== prompt {record['prompt_index'] + 1} ({len(record['prompt_ids'])} tokens) ===",
                      record["prompt"]]
        lines += [f"--- sample {record['sample'] + 1}: {len(record['completion_ids'])} new tokens, "
                  f"{stop_reason(record, report, decode)} ---", record["completion"]]
    rate = report["tokens_per_second"]
    lines += ["", f"{report['new_tokens']} new tokens in {report['seconds']:.2f} s"
              + (f" ({rate:,.0f} tokens/s, prefill included)" if rate else "")]
    return "\n".join(lines)


def json_report(report: dict) -> str:
    """One JSON document: the settings on its first line, then one line per sample."""
    head = json.dumps({k: v for k, v in report.items() if k != "samples"})
    samples = ",\n  ".join(json.dumps(record) for record in report["samples"])
    return f'{head[:-1]}, "samples": [\n  {samples}\n]}}'


def warn_beyond_training(report: dict) -> None:
    longest = max(len(r["prompt_ids"]) for r in report["samples"]) + report["sampling"]["max_new_tokens"]
    if longest > report["seq_length"]:
        print(f"{PROGRAM}: note: prompts and new tokens reach {longest} tokens, beyond the {report['seq_length']} "
              "of the model's training sequences (model.seq_length): expect it to write worse there", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(build_parser().format_help())
        return 0
    args = parse_command(argv, parse_args, program=PROGRAM, usage=build_parser().format_usage().strip())
    if isinstance(args, int):
        return args

    def work(world: int, rank: int) -> None:
        report, tokenizer = sample_all(args, world, rank)
        if rank == 0:
            print(json_report(report) if args.json else text_report(report, tokenizer.decode), flush=True)
            warn_beyond_training(report)

    return run_tool(PROGRAM, work)


if __name__ == "__main__":
    sys.exit(main())

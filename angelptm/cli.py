"""The `angelptm` command: train, plan, generate, prepare, import-hf, export-hf, report.

Bad input surfaces as `UserError`: one line on stderr, exit status 2, no traceback. Anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional

from angelptm.errors import UserError


def _train(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from angelptm.config import load_config
    from angelptm.train.faults import PeerFailure, collective_failure
    from angelptm.train.trainer import Trainer

    cfg = load_config(args.config, args.overrides)
    try:
        trainer = Trainer(cfg)
        trainer.fit()
    except RuntimeError as e:  # a peer rank that stalled or died: one line, not a traceback per rank
        line = collective_failure(e, cfg.parallel.timeout_s)
        if line is None:
            raise
        raise PeerFailure(line) from None
    # The sample reads the final checkpoint as one full model, on rank 0 alone, after the job's
    # process group is gone, so it works the same whatever the layout.
    dist.destroy_process_group()
    if cfg.train.sample_tokens and trainer.rank == 0:
        _print_sample(trainer.ckpt_root, cfg.train.sample_prompt, cfg.train.sample_tokens, temperature=0.8)
    return 0


def _print_sample(checkpoint: Path, prompt: str, max_new_tokens: int, temperature: float,
                  top_k: Optional[int] = 50, seed: int = 0, device: str = "cpu") -> None:
    from angelptm.data.tokenizers import load_tokenizer
    from angelptm.generate import generate_text
    from angelptm.finetune.lora import load_merged_model
    from angelptm.train.checkpoint import resolve_checkpoint

    folder = resolve_checkpoint(checkpoint)
    cfg, model = load_merged_model(folder, device)  # a LoRA run's adapters folded into its weights
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    text = generate_text(model, prompt, max_new_tokens, cfg.model.max_seq_len, temperature, top_k, seed, tokenizer)
    print(f"--- sample from {folder} (temperature {temperature}) ---")
    print(text)


def _generate(args: argparse.Namespace) -> int:
    if args.temperature < 0:
        raise UserError(f"--temperature={args.temperature} must be >= 0 (0 is greedy)")
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens={args.max_new_tokens} must be positive")
    _print_sample(Path(args.checkpoint), args.prompt, args.max_new_tokens, args.temperature,
                  args.top_k, args.seed, args.device)
    return 0


def _plan(argv: list[str]) -> int:
    from angelptm.plan import plan_main

    return plan_main(argv)


def _prepare(args: argparse.Namespace) -> int:
    from angelptm.data.prepare import prepare

    print(prepare(args.inputs, args.tokenizer, args.out, args.field, args.workers, args.skip_bad, sft=args.sft))
    return 0


def _import_hf(args: argparse.Namespace) -> int:
    from angelptm.models.hf import import_hf

    print(f"wrote {import_hf(Path(args.hf_dir), Path(args.out_dir))}")
    return 0


def _export_hf(args: argparse.Namespace) -> int:
    from angelptm.models.hf import export_hf

    print(f"wrote {export_hf(Path(args.checkpoint), Path(args.out_dir), adapter=args.adapter)}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from angelptm.report import report

    print(f"wrote {report([Path(f) for f in args.runs], Path(args.out) if args.out else None)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="angelptm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model from a YAML config (default: the built-in demo)")
    train.add_argument("config", nargs="?", help="YAML config; omit for the built-in demo job")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override one config key, e.g. --set train.steps=100 (repeatable)")
    train.set_defaults(run=_train)

    # `plan` has its own parser (angelptm.plan); main() hands it the rest of the command line.
    sub.add_parser("plan", help="memory, FLOPs, communication and step time for a layout", add_help=False)

    gen = sub.add_parser("generate", help="print a sample from a checkpoint")
    gen.add_argument("checkpoint", help="a step_<N> folder, or a run's output_dir (its newest checkpoint)")
    gen.add_argument("--prompt", default="")
    gen.add_argument("--max-new-tokens", type=int, default=200)
    gen.add_argument("--temperature", type=float, default=0.8, help="0: greedy decoding")
    gen.add_argument("--top-k", type=int, default=50)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--device", default="cpu")
    gen.set_defaults(run=_generate)

    prep = sub.add_parser("prepare", help="tokenize .txt / .jsonl(.gz/.zst) / .parquet files into a token file")
    prep.add_argument("inputs", nargs="+", metavar="INPUT", help="files, or folders of them (read recursively)")
    prep.add_argument("--tokenizer", required=True, help="a Hugging Face tokenizer folder, a tokenizer.json, or byte")
    prep.add_argument("--out", required=True, metavar="PREFIX", help="writes PREFIX.bin + PREFIX.json")
    prep.add_argument("--field", default="text", help="the jsonl key / parquet column holding the text")
    prep.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: one per core)")
    prep.add_argument("--skip-bad", action="store_true", help="skip (and count) malformed lines instead of stopping")
    prep.add_argument("--sft", action="store_true",
                      help="jsonl/parquet chat rows (messages, or prompt/completion), rendered with the tokenizer's "
                           "chat template; also writes PREFIX.mask, the loss mask of the assistant tokens")
    prep.set_defaults(run=_prepare)

    imp = sub.add_parser("import-hf", help="convert a Hugging Face Llama folder into a checkpoint")
    imp.add_argument("hf_dir")
    imp.add_argument("out_dir")
    imp.set_defaults(run=_import_hf)

    exp = sub.add_parser("export-hf", help="write a checkpoint as a Hugging Face Llama folder")
    exp.add_argument("checkpoint")
    exp.add_argument("out_dir")
    exp.add_argument("--adapter", action="store_true",
                     help="write the LoRA adapters alone as a PEFT adapter folder instead of merging them")
    exp.set_defaults(run=_export_hf)

    rep = sub.add_parser("report", help="plot runs' metrics (loss, lr, grad norm, tokens/s, MFU, memory) to PNG or HTML")
    rep.add_argument("runs", nargs="+", metavar="RUN_DIR", help="a run's train.output_dir; several are overlaid")
    rep.add_argument("--out", help="report.png (one figure) or report.html (a page); default RUN_DIR/report.png")
    rep.set_defaults(run=_report)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["plan"]:
            return _plan(argv[1:])
        args = build_parser().parse_args(argv)
        return args.run(args)
    except UserError as e:
        if int(os.environ.get("RANK", 0)) == 0 or getattr(e, "every_rank", False):
            print(f"angelptm: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    finally:
        dist = sys.modules.get("torch.distributed")  # only if a command loaded it: keep errors fast
        if dist is not None and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())

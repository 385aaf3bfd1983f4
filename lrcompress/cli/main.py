"""The click application. Thin: it parses, calls the library, renders with rich."""
from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape

from ..errors import LrcompressError
from ..pipeline import PipelineObserver
from .render import (allocation_tables, console, inspection_table, make_observer, plan_table, provenance_table,
                     result_event, setup_logging, summary_table)

stdout = Console() if Console().is_terminal else Console(width=200)  # logs: no wrapped names


DEBUG_ENV = "LRCOMPRESS_DEBUG"


def _debug() -> bool:
    """``--debug`` or ``LRCOMPRESS_DEBUG=1``: print the traceback behind an error message."""
    ctx = click.get_current_context(silent=True)
    flag = bool(ctx and isinstance(ctx.find_root().obj, dict) and ctx.find_root().obj.get("debug"))
    return flag or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _fail(error: Exception, code: int = 2) -> None:
    if _debug():
        console.print("".join(traceback.format_exception(error)), highlight=False, markup=False)
    console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
    sys.exit(code)


class Application(click.Group):
    """Every error a user can fix (``LrcompressError``) is one message and exit code 2, from any command;
    anything else is a bug: one line and exit code 1. The traceback only with --debug / LRCOMPRESS_DEBUG=1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except LrcompressError as error:
            _fail(error)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as error:  # noqa: BLE001 - the last line of defence: one line, not a stack trace
            _fail(RuntimeError(f"internal error ({type(error).__name__}: {error}); this is a bug in lrcompress, "
                               f"rerun with --debug (or {DEBUG_ENV}=1) for the traceback and report it"), code=1)


@click.group(cls=Application, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="debug logging")
@click.option("--log-json", is_flag=True, help="log JSON lines on stderr (for batch systems), no progress bars")
@click.option("--debug", is_flag=True, help=f"print the traceback behind an error message (also: {DEBUG_ENV}=1)")
@click.version_option(package_name="lrcompress")
@click.pass_context
def cli(ctx: click.Context, verbose: bool, log_json: bool, debug: bool) -> None:
    """Post-training compression of large language models."""
    setup_logging(verbose, log_json)
    ctx.obj = {"log_json": log_json, "debug": debug}


def _result_error(ctx: click.Context, writer: bool, error: Exception) -> None:
    """``--log-json``: a failed run still ends with its one result event on stdout."""
    if ctx.obj["log_json"] and writer:
        click.echo(json.dumps({"event": "result", "status": "error", "exit_code": 2, "message": str(error)}))


@cli.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="override a recipe key, e.g. stages.0.ratio=0.3")
@click.option("--dry-run", is_flag=True, help="print the plan (targets, shapes, parameters) and stop")
@click.option("--overwrite", is_flag=True, help="replace an existing output directory")
@click.option("--output", "output_dir", type=click.Path(path_type=Path), help="output directory (overrides output.dir)")
@click.option("--data-dir", type=click.Path(path_type=Path), help="where dataset names resolve (else recipe data_dir, $LRCOMPRESS_DATA)")
@click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
              help="processes on this machine: re-runs this command under torchrun (data parallel)")
@click.pass_context
def run(ctx: click.Context, recipe: Path, overrides: tuple[str, ...], dry_run: bool, overwrite: bool, output_dir: Path | None,
        data_dir: Path | None, nproc: int) -> None:
    """Compress a model as RECIPE says, write the checkpoint and evaluate it."""
    from ..pipeline.distributed import launched_rank, launched_world_size
    from ..recipe import load_recipe
    from ..runner import run_recipe
    from .launch import check_launch, relaunch_under_torchrun

    extra = list(overrides)
    if overwrite:
        extra.append("output.overwrite=true")
    if output_dir:
        extra.append(f"output.dir={output_dir}")
    if nproc > 1 and launched_world_size() == 1:
        try:                  # one message here, rather than one from every process and then torchrun's traceback
            check_launch(load_recipe(recipe, extra), nproc)
        except LrcompressError as error:
            _result_error(ctx, True, error)
            raise
        relaunch_under_torchrun(nproc, sys.argv[1:])     # does not return
    writer = launched_rank() == 0
    if not writer:                                        # one voice: rank 0 logs and renders
        logging.getLogger().setLevel(logging.WARNING)

    from ..preflight import PlanRefused

    observer = make_observer(ctx.obj["log_json"]) if writer else PipelineObserver()
    try:
        parsed = load_recipe(recipe, extra)
        result = run_recipe(parsed, observer, str(data_dir) if data_dir else None, dry_run=dry_run)
    except LrcompressError as error:
        if dry_run and isinstance(error, PlanRefused):   # show the plan that is refused, then why
            stdout.print(plan_table(error.plan))
        _result_error(ctx, writer, error)
        raise
    if not writer:
        return
    if ctx.obj["log_json"]:   # batch systems: the log on stderr, exactly one JSON result on stdout
        event = result_event(result, dry_run)
        if dry_run and result.costs is not None:
            event["costs"] = result.costs.to_dict()
        click.echo(json.dumps(event, default=str))
        return
    if dry_run:
        _print_dry_run(result)
        return
    stdout.print(summary_table(result.metrics, result.output_dir))
    from .render_eval import lm_eval_table

    tasks = lm_eval_table(result.metrics.eval)
    if tasks is not None:
        stdout.print(tasks)


def _print_dry_run(result) -> None:
    """The plan, its predicted costs, the data it would read and (after a pre-pass) the allocated ranks."""
    from .render_costs import cost_lines, cost_table

    stdout.print(plan_table(result.plan))
    if result.costs is not None:
        stdout.print(cost_table(result.costs))
        for line in cost_lines(result.costs):
            stdout.print(line, highlight=False)
    for line in result.data_sources:
        stdout.print(line, highlight=False)
    if result.metrics.allocation:   # the spectra pre-pass ran to choose the ranks above
        for table in allocation_tables(result.metrics.allocation):
            stdout.print(table)


@cli.command("eval")
@click.argument("checkpoint")
@click.option("--dataset", default="wikitext2", show_default=True,
              help="wikitext2, a .txt/.jsonl/.parquet file, or a hub dataset id")
@click.option("--config", "dataset_config", default=None, help="hub dataset config")
@click.option("--split", default="test", show_default=True)
@click.option("--text-column", default="text", show_default=True, help="the column holding the text")
@click.option("--seq-len", default=512, show_default=True)
@click.option("--max-windows", type=int, default=None, help="cap the number of windows (cost)")
@click.option("--perplexity/--no-perplexity", default=True, show_default=True, help="token-level perplexity")
@click.option("--tasks", help="lm-eval tasks, comma-separated (arc_easy,arc_challenge,piqa,lambada_openai read local files)")
@click.option("--limit", type=int, default=None, help="lm-eval: first N documents of each task")
@click.option("--num-fewshot", type=int, default=None, help="lm-eval: few-shot examples")
@click.option("--include-path", "include_paths", multiple=True, type=click.Path(path_type=Path),
              help="lm-eval: a directory of your own task YAMLs (repeatable)")
@click.option("--batch-size", default=4, show_default=True)
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--data-dir", type=click.Path(path_type=Path))
@click.option("--output", type=click.Path(path_type=Path), help="write the results as JSON (usable as check --baseline)")
@click.option("--cache", is_flag=True, help="reuse/store the result in the baseline cache (model + settings fingerprint)")
@click.option("--json", "as_json", is_flag=True,
              help="print JSON: the perplexity result; with --tasks the whole eval section")
@click.option("--protocol", type=click.Choice(["standard"]),
              help="the standard evaluation (WikiText-2 and web-text test, 40×512; arc_easy, arc_challenge, piqa, "
                   "lambada_openai at 200 documents), instead of the dataset and task options")
def eval_command(checkpoint: str, dataset: str, dataset_config: str | None, split: str, text_column: str,
                 seq_len: int, max_windows: int | None, perplexity: bool, tasks: str | None, limit: int | None,
                 num_fewshot: int | None, include_paths: tuple[Path, ...], batch_size: int, device: str,
                 data_dir: Path | None, output: Path | None, cache: bool, as_json: bool,
                 protocol: str | None) -> None:
    """Perplexity and lm-eval tasks of any checkpoint, compressed or not (HF dir, .gguf, lrcompress dir)."""
    from pydantic import ValidationError

    from ..data import DatasetRef, check_source
    from ..data import data_dir as resolve_data_dir
    from ..eval import EvalContext
    from ..eval.lm_eval_tasks import check_tasks, parse_tasks
    from ..results.metrics import EvalReport
    from ..eval.suite import evaluate_checkpoint
    from ..pipeline.settings import resolve_device
    from ..recipe import EvalSpec, LmEvalSpec, PerplexitySpec
    from .render_eval import lm_eval_table, perplexity_lines

    try:
        ppl_specs = [PerplexitySpec(dataset=dataset, config=dataset_config, split=split, text_column=text_column,
                                    seq_len=seq_len, max_windows=max_windows)] if perplexity else []
        lm_spec = LmEvalSpec(tasks=parse_tasks(tasks), limit=limit, batch_size=batch_size, num_fewshot=num_fewshot,
                             include_path=[str(p) for p in include_paths]) if tasks else None
        if protocol is not None:                    # the recipe's preset (recipe.STANDARD_EVAL)
            standard = EvalSpec(protocol=protocol)
            ppl_specs, lm_spec = standard.perplexity, standard.lm_eval.model_copy(update={"batch_size": batch_size})
        if not ppl_specs and lm_spec is None:
            raise LrcompressError("nothing to evaluate: --no-perplexity and no --tasks")
        directory = resolve_data_dir(str(data_dir) if data_dir else None)
        for spec in ppl_specs:                      # before the model load: seconds, not minutes
            check_source(DatasetRef.of(spec), directory)
        if lm_spec is not None:
            check_tasks(lm_spec.tasks, directory, lm_spec.include_path)
        context = EvalContext(directory, resolve_device(device), batch_size,
                              (lambda message: None) if as_json else console.log)
        section, cached = evaluate_checkpoint(checkpoint, EvalSpec(perplexity=ppl_specs, lm_eval=lm_spec), context,
                                              cache)
    except ValidationError as error:
        raise LrcompressError("; ".join(f"--{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())) \
            from None
    if output:
        EvalReport(eval=section, model_source=checkpoint, baseline_cache=cached).save(output)
    if as_json:  # perplexity alone: its result object, as before lm-eval tasks existed; else the section
        alone = lm_spec is None and len(section.perplexity) == 1
        shown = next(iter(section.perplexity.values())).model_dump() if alone else section.dump()
        click.echo(json.dumps(shown, indent=2))
        return
    for line in perplexity_lines(section):
        stdout.print(line, highlight=False)
    table = lm_eval_table(section)
    if table is not None:
        stdout.print(table)
    if cached:
        stdout.print(f"baseline cache: {'hit' if cached.hit else 'stored'} {cached.path}", highlight=False)


@cli.command()
@click.argument("metrics", type=click.Path(path_type=Path))
@click.option("--baseline", type=click.Path(path_type=Path),
              help="baseline metrics.json / eval --output / cache file (default: the run's own dense baseline)")
@click.option("--gate", "gate_file", type=click.Path(path_type=Path), help="YAML gate file with the thresholds")
@click.option("--max-ppl-increase", type=float, help="max relative perplexity increase, e.g. 0.1 for +10%")
@click.option("--min-recovery", type=float, help="min accuracy recovery (run / baseline), e.g. 0.95")
@click.option("--bound", "bounds", multiple=True, metavar="METRIC<=X|METRIC>=X", help="absolute bound, repeatable")
@click.option("--confidence", type=float, help="a regression must exceed the noise at this one-sided confidence "
              "(z-test with both standard errors; default 0.95)")
@click.option("--strict/--no-strict", default=None, help="also fail (exit 1) when the sample is too small to decide")
def check(metrics: Path, baseline: Path | None, gate_file: Path | None, max_ppl_increase: float | None,
          min_recovery: float | None, bounds: tuple[str, ...], confidence: float | None, strict: bool | None) -> None:
    """Regression gate: exit 0 when no metric regresses beyond the noise (a miss within the noise is
    reported as "too small" and passes unless --strict), 1 on a regression, 2 on bad input."""
    from ..results.gate import gate_from_options, run_gate
    from .render_eval import gate_table

    gate = gate_from_options(gate_file, max_ppl_increase, min_recovery, list(bounds), confidence, strict)
    result = run_gate(metrics, baseline, gate)
    stdout.print(gate_table(result))
    if result.inconclusive:
        console.print(f"[yellow]warning:[/] {len(result.inconclusive)} check(s) missed the threshold by less than "
                      f"the noise: the sample is too small to decide ({'failing: --strict' if result.strict else 'not failing; --strict fails them'})",
                      highlight=False)
    sys.exit(0 if result.passed else 1)


@cli.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--output", type=click.Path(path_type=Path), default=Path("."), show_default=True,
              help="where compare.md and the rate_distortion*.png plots go")
def compare(runs: tuple[Path, ...], output: Path) -> None:
    """Compare run directories: a table and a rate–distortion plot per shared perplexity (vs whole-model bytes)."""
    from ..results.compare import compare_runs
    from .render_eval import compare_table

    comparison = compare_runs(list(runs), output)
    for warning in comparison.warnings:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    stdout.print(compare_table(comparison.header, comparison.rows))
    written = [comparison.table] + comparison.plots
    stdout.print(f"wrote {' and '.join(map(str, written))}", highlight=False)


@cli.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
def inspect(checkpoint: Path) -> None:
    """What was compressed: modules, kinds, ranks, sizes, errors (from metrics.json when present)."""
    from ..results.inspect import inspect_checkpoint

    inspection = inspect_checkpoint(checkpoint)
    stdout.print(inspection_table(inspection))
    if inspection.allocation:
        for table in allocation_tables(inspection.allocation):
            stdout.print(table)
    if inspection.provenance:
        stdout.print(provenance_table(inspection.provenance))


@cli.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.argument("output", type=click.Path(path_type=Path))
@click.option("--dense", is_flag=True, help="write a plain dense HF checkpoint")
@click.option("--peft", is_flag=True, help="write OUTPUT/base (dense base model) + OUTPUT/adapter (the "
              "compensation paths as a PEFT LoRA adapter)")
@click.option("--format", "format_", type=click.Choice(["compressed-tensors"]),
              help="a standard quantized format (rtn/gptq checkpoints; needs the compressed-tensors package)")
@click.option("--for", "runtime", type=click.Choice(["transformers", "vllm"]), default="transformers",
              show_default=True, help="the loader a compressed-tensors export (--format, or --peft's base) is "
              "shaped for: they disagree on the zero points' shape (docs/vllm.md)")
@click.option("--scheme", type=click.Choice(["auto", "wna16", "w8a8"]), default="auto", show_default=True,
              help="compressed-tensors scheme: wna16 = the checkpoint's weight-only codes (exact); w8a8 = int8 "
              "weights re-quantized per channel + int8 per-token activations (vLLM CPU serves it); auto: w8a8 "
              "with --for vllm when a module is not 4-bit, else wna16 (docs/vllm.md)")
@click.option("--overwrite", is_flag=True)
def export(checkpoint: Path, output: Path, dense: bool, peft: bool, format_: str | None, runtime: str,
           scheme: str, overwrite: bool) -> None:
    """Export CHECKPOINT to OUTPUT (--dense: a plain checkpoint any tool loads; --peft: base + LoRA adapter;
    --format compressed-tensors: the quantized weights in that format)."""
    from ..checkpoint import export_dense, export_peft
    from ..checkpoint.compressed_tensors import export_compressed_tensors
    from ..models import load_model

    if [dense, peft, format_ is not None].count(True) != 1:
        _fail(click.UsageError("give exactly one of --dense, --peft or --format"))
    if scheme != "auto" and format_ is None:
        _fail(click.UsageError("--scheme applies to --format compressed-tensors (--peft's base takes auto)"))
    loaded = load_model(str(checkpoint))
    if peft:
        written = export_peft(loaded.model, loaded.tokenizer, output, overwrite, runtime)
    elif format_:
        count, scheme = export_compressed_tensors(loaded.model, loaded.tokenizer, output, overwrite, runtime, scheme)
    else:
        export_dense(loaded.model, loaded.tokenizer, output, overwrite)
    if peft:
        stdout.print(f"wrote base model to {written.base_dir} and a LoRA adapter for {written.modules} modules "
                     f"to {written.adapter_dir}")
        return
    if format_:
        stdout.print(f"wrote {count} quantized modules as {format_} ({scheme}) to {output}")
        return
    stdout.print(f"wrote dense checkpoint to {output}")


@cli.command("bench-infer")
@click.argument("checkpoint")
@click.option("--dense", help="the dense original (default: the source model the checkpoint's provenance names)")
@click.option("--prompt-tokens", type=click.IntRange(min=1), default=512, show_default=True, help="prefill length")
@click.option("--new-tokens", type=click.IntRange(min=1), default=64, show_default=True, help="tokens generated")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True, help="median over this many")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="also write the report as JSON")
def bench_infer(checkpoint: str, dense: str | None, prompt_tokens: int, new_tokens: int, batch: int, threads: int,
                repeats: int, json_path: Path | None) -> None:
    """Prefill and decode tokens/s and memory of CHECKPOINT and its dense original, in one process."""
    from ..eval.inference_bench import InferenceSettings, bench_checkpoint
    from .render import inference_table

    settings = InferenceSettings(prompt_tokens, new_tokens, batch, threads, repeats)
    report = bench_checkpoint(checkpoint, dense, settings)
    stdout.print(inference_table(report))
    if json_path is not None:
        json_path.write_text(json.dumps(report, indent=2))


def main() -> None:
    cli(prog_name="lrcompress")


if __name__ == "__main__":
    main()

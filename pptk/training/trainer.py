# The one training loop: engine, resume, steps, evaluation cadence, metrics, checkpoints, export and the summary.
"""``Trainer(run, prepare).fit()`` is all a recipe calls. In order:

1. on every rank alike, before any process group: the task reads and checks its inputs (``prepare``), then the
   layout, the step plan (epochs -> steps), the filled DeepSpeed config, the stage plan and a resume
   checkpoint's compatibility are settled, so bad input fails everywhere the same way and no rank waits;
2. the process group, this rank's stage and the engine; the checkpoint, if resuming;
3. the steps: train, log every ``log_every``, checkpoint every ``save_every`` (and at epoch ends and the last
   step) when the weights are sound (``saving``), then evaluate when due: a failing evaluation never costs the
   trained weights;
4. the Hugging Face export, the task's closing extras and the summary.
"""

from __future__ import annotations

import itertools
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from pptk import deepspeed_compat as compat
from pptk.checkpoints.convert import check_export_destination
from pptk.checkpoints.lora_checkpoint import check_lora_resume, check_lora_run
from pptk.checkpoints.training import check_layer_files, find_checkpoint, read_manifest, same_layout
from pptk.data.sampler import Shard, sample_positions, train_indices
from pptk.errors import PptkError
from pptk.launch.watch import exit_on_sigterm, watch_launcher
from pptk.logs import get_logger, setup_logging
from pptk.parallel.layout import Layout
from pptk.parallel.pipeline import PipelinePlan, plan_pipeline
from pptk.parallel.profile import agree_on_profile
from pptk.parallel.recompute import check_one_checkpointing
from pptk.parallel.schedules import check_eval_micro_batches
from pptk.parallel.sequence_parallel import check_sequence_lengths
from pptk.training.config import RunConfig
from pptk.training.engine import build_engine, init_distributed, load_run_ds_config, resolve_ds_config, resolve_layout
from pptk.training.guards import DivergenceGuard, nan_loss_failpoint
from pptk.training.observe import PipelineObserver, peak_tflops, precision_of
from pptk.training.reporting import MetricsLog, Summary, format_evaluation
from pptk.training.run_dir import check_free_space, claim_output_dir, release_output_dir, start_fresh
from pptk.training.saving import Saver, stop_when_diverged
from pptk.training.step_plan import StepPlan, plan_steps
from pptk.training.task_hooks import Batch, PreparedTask
from pptk.training.token_mean import global_items

log = get_logger(__name__)


class Trainer:
    def __init__(self, run: RunConfig, prepare: Callable[[RunConfig], PreparedTask]):
        self.run = run
        self.prepare = prepare

    def fit(self) -> Summary | None:
        """Train as configured; returns the summary on rank 0 (None elsewhere)."""
        setup_logging(all_ranks=self.run.output.log_all_ranks)
        exit_on_sigterm()
        watch_launcher()  # a signal to `deepspeed` alone must not leave this rank training as an orphan
        out = self.run.output
        resuming = out.resume_from is not None
        holds_lock = claim_output_dir(out.output_dir, resuming=resuming, overwrite=out.overwrite)
        if holds_lock and out.overwrite and not resuming:
            start_fresh(out.output_dir)
        try:
            # DeepSpeed's pipeline sends activations with broadcast inside autograd; torch warns about it on every
            # step. The gradients are sent explicitly by the engine, so the warning does not apply.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r"c10d::broadcast_: an autograd kernel was not registered")
                return self._fit()
        finally:
            if holds_lock:
                release_output_dir(out.output_dir)

    # ------------------------------------------------------------------------------------------------- set-up

    def _fit(self) -> Summary | None:
        run = self.run
        task = self.prepare(run)
        raw_ds_config = load_run_ds_config(run)
        layout = resolve_layout(run, raw_ds_config)
        steps = plan_steps(run, num_examples=task.num_train_examples, layout=layout)
        ds_config = resolve_ds_config(run, raw_ds_config, layout, total_steps=steps.max_steps)
        plan = plan_pipeline(
            task.source,
            num_stages=layout.pp,
            task=task.task,
            partition_method=run.parallel.partition_method,
            seq_len=task.seq_len,
            attn_implementation=run.model.attn_implementation,
            dropout=run.model.dropout,
            schedule=layout.schedule,
            micro_batch_size=layout.micro_batch_size,
            tp=layout.tp,
            # only a task whose loss is the plan's causal-LM loss can read vocabulary-split logits (not DPO's)
            vocab_parallel=None
            if run.parallel.vocab_parallel and getattr(task, "vocab_parallel_loss", False)
            else False,
            sequence_parallel=run.parallel.sequence_parallel,
            recompute_attention=run.parallel.selective_checkpointing,
        )
        if run.parallel.sequence_parallel and run.model.dropout:
            log.warning(
                "--sequence-parallel with dropout on: every tp rank draws the same dropout stream, so the masks of the "
                "sequence chunks repeat every S/tp positions (Megatron forks the RNG there; pptk does not yet). "
                "Pass --no-dropout if that matters"
            )
        check_one_checkpointing(
            selective=run.parallel.selective_checkpointing, interval=run.parallel.activation_checkpoint_interval
        )
        if run.parallel.sequence_parallel:
            check_sequence_lengths(seq_len=task.seq_len, tp=layout.tp, dynamic_shape=task.dynamic_shape)
        if task.task == "causal-lm":
            check_eval_micro_batches(
                layout.schedule, pp=layout.pp, count=run.output.eval_batches, what="--eval-batches"
            )
        lora_note = "" if run.lora is None else check_lora_run(run.lora, plan, export_adapter=run.output.export_adapter)
        start_step = self._check_resume(plan, layout, steps)
        if run.output.export_hf is not None:  # found out now, not after the training
            check_export_destination(run.output.export_hf, overwrite=True)
        if run.lora is None:  # a LoRA checkpoint holds the adapters alone: small
            check_free_space(run.checkpoints_dir, params=sum(c.unique_params for c in plan.stages.costs))

        init_distributed()
        plan = agree_on_profile(plan)
        rank = dist.get_rank()
        engine = build_engine(
            plan,
            layout=layout,
            ds_config=ds_config,
            seed=run.seed,
            loss_fn=task.loss_fn(plan),
            activation_checkpoint_interval=run.parallel.activation_checkpoint_interval,
            dynamic_shape=task.dynamic_shape,
            lora=run.lora,
        )
        scaling = compat.loss_scale_state(engine.optimizer) or {}  # fp16's dynamic scaler skips updates by design
        guard = DivergenceGuard(
            factor=run.optim.loss_spike_factor,
            max_bad_steps=run.optim.max_bad_steps,
            dynamic_loss_scale=bool(scaling.get("dynamic") or scaling.get("dynamic_loss_scale")),
        )
        if run.output.resume_from is not None:
            from pptk.checkpoints.training import resume

            manifest = resume(engine, plan, layout=layout, path=run.output.resume_from)
            guard.recent.extend(manifest.get("recent_losses", []))  # judged from the first resumed step on
        shard = Shard(
            dp_rank=engine.grid.get_data_parallel_rank(),
            dp_size=layout.dp,
            micro_batch_size=layout.micro_batch_size,
            grad_accum_steps=layout.grad_accum_steps,
        )
        if hasattr(task, "engine_ready"):  # e.g. a pass over the data before the first step (every rank)
            task.engine_ready(engine, shard)
        if rank == 0:
            log.info(
                f"{task.source.label}: {layout.describe()}; {task.describe()}; {steps.max_steps} steps"
                + (f", {steps.steps_per_epoch} per epoch" if steps.steps_per_epoch else "")
                + f"\n{plan.stages.describe()}"
                + lora_note
            )
            hf_config = run.output.output_dir / "hf_config"  # what a later export needs
            hf_config.mkdir(parents=True, exist_ok=True)
            plan.config.save_pretrained(hf_config)
            task.tokenizer.save_pretrained(hf_config)
        metrics = MetricsLog(
            output_dir=run.output.output_dir,
            active=rank == 0,
            run_config={**run.to_dict(), "layout": layout.describe()},
            total_steps=steps.max_steps,
            start_step=start_step,
            wandb_project=run.output.wandb_project,
            requested_wandb_mode=run.output.wandb_mode,
        )
        observer = PipelineObserver(
            engine,
            plan=plan,
            layout=layout,
            tokens_per_step=layout.global_batch_size * task.tokens_per_example(),
            precision=precision_of(ds_config),
            peak=peak_tflops(precision=precision_of(ds_config), override=run.parallel.peak_tflops),
            out=run.output.output_dir,
        )
        loop = _Loop(
            run=run,
            task=task,
            plan=plan,
            layout=layout,
            steps=steps,
            engine=engine,
            shard=shard,
            metrics=metrics,
            rank=rank,
            observer=observer,
            guard=guard,
            saver=Saver(run=run, engine=engine, plan=plan, layout=layout, guard=guard, rank=rank),
        )
        try:
            with stop_when_diverged(rank=rank, checkpoints_dir=run.checkpoints_dir):
                summary = loop.train(start_step)
        finally:
            summary_wandb = metrics.close()
        summary.wandb = summary_wandb
        return self._finish(task, summary, rank)

    def _check_resume(self, plan: PipelinePlan, layout: Layout, steps: StepPlan) -> int:
        """Read --resume-from before any rank starts: it exists, fits this model and batch, and has steps left."""
        if self.run.output.resume_from is None:
            return 0
        tag_dir = find_checkpoint(self.run.output.resume_from)
        manifest = read_manifest(tag_dir)
        same_layout(manifest, plan, layout)  # raises when the model, task or global batch differ
        check_lora_resume(manifest, self.run.lora, plan, seed=self.run.seed)
        check_layer_files(tag_dir)
        step = manifest["step"]
        if step >= steps.max_steps:
            raise PptkError(
                f"the checkpoint is at step {step} and the run ends at step {steps.max_steps}; raise "
                "--max-steps (or --epochs)"
            )
        return step

    def _export(self, task: PreparedTask, summary: Summary) -> None:
        """Rank 0, from the last checkpoint: the Hugging Face directory (LoRA: merged), the PEFT adapter directory."""
        from pptk.checkpoints.convert import ds_to_hf
        from pptk.checkpoints.lora_convert import export_adapter, export_merged

        out = self.run.output
        if out.export_adapter is not None:
            export_adapter(self.run.checkpoints_dir, out.export_adapter)
            summary.extra["export_adapter"] = str(out.export_adapter)
        if out.export_hf is not None:
            if self.run.lora is not None:  # the base with the adapters merged in (fp32)
                export_merged(self.run.checkpoints_dir, out.export_hf, overwrite=True)
            else:
                ds_to_hf(self.run.checkpoints_dir, out.export_hf, overwrite=True)
            summary.export_hf = str(out.export_hf)
            summary.extra.update(task.after_export(out.export_hf))

    def _finish(self, task: PreparedTask, summary: Summary, rank: int) -> Summary | None:
        run = self.run
        if rank == 0:
            self._export(task, summary)
        if run.output.export_hf is not None or run.output.export_adapter is not None:
            dist.barrier()
        if rank != 0:
            return None
        summary.extra = {**task.summary_extra(), **summary.extra}
        summary.write(run.output.output_dir)
        return summary


@dataclass
class _Loop:
    """The step loop of one run, with everything it needs at hand."""

    run: RunConfig
    task: PreparedTask
    plan: PipelinePlan
    layout: Layout
    steps: StepPlan
    engine: Any
    shard: Shard
    metrics: MetricsLog
    rank: int
    observer: PipelineObserver
    guard: DivergenceGuard
    saver: Saver

    def batches(self, start_step: int) -> Iterator[Batch]:
        """The one sampler: this replica's micro-batches from ``start_step`` on, as the task builds them."""
        per_epoch = None
        if self.steps.steps_per_epoch is not None:
            per_epoch = self.steps.steps_per_epoch * self.layout.grad_accum_steps
        start = start_step * self.layout.grad_accum_steps
        if getattr(self.task, "samples_by_position", False):  # the task maps global sample indices to data itself
            indices = sample_positions(self.shard, start=start)
        else:
            indices = train_indices(
                self.task.num_train_examples, self.shard, seed=self.run.seed, start=start, per_epoch=per_epoch
            )
        for number, chosen in enumerate(indices, start):
            yield self.task.train_batch(chosen, number, self.shard)

    def evaluate(self, step: int, summary: Summary) -> None:
        try:
            result = self.task.evaluate(self.engine, self.shard, max_micro_batches=self.run.output.eval_batches)
        except ValueError as err:  # DeepSpeed's DualPipeVSchedule: too few micro-batches (the eval set is small)
            if "DualPipeV needs at least" not in str(err):
                raise
            raise PptkError(
                f"evaluation: {err}; lower --micro-batch-size so the eval set fills {2 * self.layout.pp} "
                "micro-batches per replica, or use --schedule 1f1b"
            ) from None
        if result is None:
            return
        epoch = self.steps.epoch_of(step)
        record = {"step": step, **({"epoch": epoch} if epoch is not None else {}), **result.metrics}
        summary.evaluations.append(record)
        self.metrics.log(record)
        if self.rank == 0:
            log.info(format_evaluation(record, result.report))

    def _step_data(self, data: Iterator[Batch]) -> tuple[Iterator[Batch], int | None]:
        """The step's micro-batches, and for a task whose loss is a mean over the step's tokens (SFT, masked-LM) the
        count of those tokens over every replica, which it then normalises by (pptk.training.token_mean)."""
        token_mean = getattr(self.task, "token_mean_loss", None)
        if token_mean is None:
            return data, None
        batches = list(itertools.islice(data, self.layout.grad_accum_steps))
        group = self.engine.grid.get_data_parallel_group() if self.layout.dp > 1 else None
        items = global_items(token_mean.local_items(batches), group=group)
        token_mean.begin_step(total_items=items, micro_batches=self.layout.grad_accum_steps * self.layout.dp)
        return iter(batches), items

    def train(self, start_step: int) -> Summary:
        run, steps, engine = self.run, self.steps, self.engine
        summary = Summary(task=self.task.task, checkpoints=str(run.checkpoints_dir), metrics=str(self.metrics.path))
        if run.output.eval_at_start and start_step == 0:
            self.evaluate(0, summary)
        self.saver.start()
        data = self.batches(start_step)
        samples_per_step = self.layout.global_batch_size
        tokens_per_sample = self.task.tokens_per_example()
        window_time, window_steps, train_time = 0.0, 0, 0.0  # time inside train_batch only
        for step in range(start_step + 1, steps.max_steps + 1):
            began = time.perf_counter()
            logs = step % run.output.log_every == 0 or step == steps.max_steps
            skipped = compat.skipped_optimizer_steps(engine)
            step_data, items = self._step_data(data)
            with self.observer.step(synchronize=logs), nan_loss_failpoint(engine, step=step):
                loss = float(engine.train_batch(step_data))  # the observer times the steps whose metrics are logged
            update_skipped = compat.skipped_optimizer_steps(engine) > skipped
            took = time.perf_counter() - began
            window_time, window_steps, train_time = window_time + took, window_steps + 1, train_time + took
            if update_skipped and self.rank == 0:
                log.warning(f"step {step}: loss {loss}; DeepSpeed skipped the update (non-finite gradients)")
            bad_step = self.guard.check(loss, step=step, update_skipped=update_skipped)  # why; raises Diverged to stop
            summary.first_loss = loss if step == start_step + 1 else summary.first_loss
            summary.last_loss = loss
            self.metrics.advance(loss=loss)
            if logs:
                samples_per_s = samples_per_step * window_steps / window_time
                self.metrics.log(
                    {
                        "step": step,
                        "loss": loss,
                        "lr": engine.get_lr()[0],
                        "tokens_per_s": samples_per_s * tokens_per_sample,
                        "samples_per_s": samples_per_s,
                        **({"supervised_tokens": items} if items is not None else {}),
                        **(self.task.step_metrics() if hasattr(self.task, "step_metrics") else {}),
                        **self.observer.metrics(step),
                    }
                )
                window_time, window_steps = 0.0, 0
            if steps.saves(step):  # before the evaluation: a failing one must not cost the trained weights
                data = self.saver.save(step, bad_step=bad_step, data=data)
            if steps.evaluates(step):
                self.evaluate(step, summary)
        self.saver.check_last_save(steps.max_steps)
        summary.steps = steps.max_steps - start_step
        if train_time:
            summary.tokens_per_s = samples_per_step * tokens_per_sample * summary.steps / train_time
        return summary

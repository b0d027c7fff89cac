"""A training stage from start (or the newest checkpoint) to its merged final model.

`train(config, workdir)` is everything `launch/train.py` does:
  1. multi-host setup, a device mesh, a writable workdir (checked before any work);
  2. the starting weights (`model.init`), frozen, plus the trainable tree (LoRA or all);
  3. resume: the newest complete checkpoint restores state and every process's data position,
     and metrics.jsonl forgets the steps that will be redone;
  4. the jitted step over sharded global batches, with a one-step lag on reading metrics so the host
     never stalls the device;
  5. checkpoints every `checkpoint.every_steps` and at the end, periodic evaluation, and finally
     WORKDIR/model: an Orbax model directory with LoRA merged, the next stage's `model.init`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from unite_jax import parallel
from unite_jax.convert import orbax_model
from unite_jax.data import media
from unite_jax.data.pipeline import BatchSpec, build_train_iterator, make_processor, prefetch_to_device
from unite_jax.data.tokenize import PromptTokenizer
from unite_jax.encoding import MeshEncoder
from unite_jax.model import lora as lora_lib
from unite_jax.model.config import ModelConfig
from unite_jax.model.options import LoraOptions, RunOptions, default_attention
from unite_jax.model.params import abstract_params
from unite_jax.progress import Progress, console
from unite_jax.train import jitted, model_init
from unite_jax.train.checkpoint import RunCheckpointer
from unite_jax.train.metrics_log import MetricsLog, Throughput, console_fields
from unite_jax.train.optim import make_optimizer
from unite_jax.train.step import full_params

MODEL_DIR = "model"
CHECKPOINT_DIR = "checkpoints"
# Parameters the embedding never reads (the LM head): never trained, carried along for export.
UNUSED_BY_EMBEDDING = ("lm_head",)


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite loss, bad configuration); the last good checkpoint is kept."""


# ---------------------------------------------------------------------------- configuration helpers
def run_options(config: ml_collections.ConfigDict, platform: str | None = None) -> RunOptions:
    """How the stage computes (dtypes, remat, positions, attention, LoRA scale and dropout, the vision tile).

    platform: where the step will run ("tpu", "gpu", "cpu"); default: JAX's default backend (the AOT
    checker compiles for a TPU from a CPU host).
    """
    platform = platform or jax.default_backend()
    attention = config.model.attention_impl or default_attention(platform, config.model.compute_dtype)
    rank = config.lora.rank
    lora = LoraOptions(lora_lib.lora_scale(config.lora.alpha, rank), config.lora.dropout) if rank > 0 else None
    # the vision tower attends tile by tile, in the pipeline's static tiles
    return RunOptions(positions=config.model.positions, compute_dtype=config.model.compute_dtype,
                      param_dtype=config.model.dtype, attention_impl=attention, remat=config.model.remat,
                      scan_layers=config.model.scan_layers, vision_block=int(config.data.vision_block), lora=lora)


def lora_targets(config) -> tuple[str, ...]:
    return tuple(t.strip() for t in str(config.lora.targets).split(",") if t.strip())


def batch_geometry(config, mesh) -> tuple[int, int, int]:
    """(num_chunks, rows_per_shard per chunk, local shards) with clear errors when the batch does not split."""
    shards = parallel.num_batch_shards(mesh)
    chunks = config.train.grad_cache_chunks
    global_batch = config.train.global_batch_size
    if chunks < 1 or global_batch % (chunks * shards):
        raise ValueError(f"train.global_batch_size={global_batch} must be a multiple of train.grad_cache_chunks="
                         f"{chunks} x {shards} batch shards of the mesh {dict(mesh.shape)}")
    return chunks, global_batch // (chunks * shards), parallel.local_batch_shards(mesh)


def eval_tasks(spec: str) -> list[tuple[str, str, str]]:
    """(name, queries, candidates) from `eval.files`: comma-separated entries, each a directory with
    queries.jsonl + candidates.jsonl, a directory of such task directories, or `Q.jsonl|C.jsonl`."""
    tasks = []
    for entry in [e.strip() for e in str(spec or "").split(",") if e.strip()]:
        if "|" in entry:
            queries, candidates = entry.split("|", 1)
            tasks.append((os.path.splitext(os.path.basename(queries))[0], queries, candidates))
            continue
        if not os.path.isdir(entry):
            raise FileNotFoundError(f"eval.files entry {entry!r}: not a directory and not 'QUERIES|CANDIDATES'")
        if os.path.exists(os.path.join(entry, "queries.jsonl")):
            candidates = [(entry, os.path.basename(os.path.normpath(entry)))]
        else:
            candidates = [(os.path.join(entry, d), d) for d in sorted(os.listdir(entry))
                          if os.path.exists(os.path.join(entry, d, "queries.jsonl"))]
            if not candidates:
                raise FileNotFoundError(f"eval.files entry {entry!r} has no queries.jsonl and no task "
                                        f"sub-directories with one")
        tasks += [(name, os.path.join(d, "queries.jsonl"), os.path.join(d, "candidates.jsonl"))
                  for d, name in candidates]
    return tasks


def check_workdir(workdir: str) -> None:
    """Creates the workdir and proves it is writable, before any expensive work."""
    from etils import epath

    path = epath.Path(workdir)
    probe = path / f".write_probe_{jax.process_index()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"workdir {workdir!r} is not writable: {e}") from e


def _config_json(config) -> dict:
    return json.loads(config.to_json_best_effort())


# ---------------------------------------------------------------------------- trainable tree
def split_trainable(base: dict, config, cfg: ModelConfig, lora_shardings) -> tuple[dict, dict]:
    """(frozen, trainable): LoRA pairs over the whole frozen base, or every parameter the embedding uses
    (kept in `train.master_dtype`) over the frozen unused rest."""
    if config.lora.rank > 0:
        lora = lora_lib.init_lora(cfg, config.lora.rank, seed_or_key=config.seed + 1, targets=lora_targets(config),
                                  dtype=config.train.master_dtype)
        return base, parallel.place_tree(lora, lora_shardings, in_place=True)
    frozen = {k: v for k, v in base.items() if k in UNUSED_BY_EMBEDDING}
    master = jnp.dtype(config.train.master_dtype)
    trainable = {k: jax.tree.map(lambda x: x.astype(master), v) for k, v in base.items()
                 if k not in UNUSED_BY_EMBEDDING}
    return frozen, trainable


def merged_params(frozen: dict, trainable: dict, run: RunOptions, shardings) -> dict:
    """Full parameters in the param dtype with LoRA folded in (the stage's final model)."""
    if run.lora is not None:
        merge = jax.jit(functools.partial(lora_lib.merge_lora, scale=run.lora.scale), out_shardings=shardings)
        return merge(frozen, trainable)
    dtype = jnp.dtype(run.param_dtype)
    return {**frozen, **jax.tree.map(lambda x: x.astype(dtype), trainable)}


# ---------------------------------------------------------------------------- the run
def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs (or resumes) one stage; returns a summary with the final metrics and the model directory."""
    parallel.maybe_initialize_distributed(config.distributed.coordinator_address or None,
                                          config.distributed.num_processes or None,
                                          None if config.distributed.process_id < 0 else config.distributed.process_id)
    is_main = jax.process_index() == 0
    check_workdir(workdir)
    total_steps = int(config.train.steps)
    if total_steps < 1:
        raise ValueError(f"train.steps must be >= 1, got {total_steps}")
    devices = jax.devices()[:config.mesh.num_devices] if config.mesh.num_devices else None
    mesh = parallel.make_mesh(tuple(config.mesh.shape), devices=devices)
    chunks, rows_per_shard, local_shards = batch_geometry(config, mesh)
    stage = config.stage
    model_dir = os.path.join(workdir, MODEL_DIR)
    if _finished(model_dir, total_steps):
        console(f"{stage}: {model_dir} is already complete ({total_steps} steps); nothing to do")
        return {"model_dir": model_dir, "steps": total_steps, "resumed_finished": True}

    cfg = model_init.model_config(config.model)
    run = run_options(config)
    assets = model_init.prepare_assets(config.model, workdir, jax.process_index())
    tokenizer = PromptTokenizer.from_pretrained(assets)
    tokenizer.check_model_ids(cfg.image_token_id, cfg.video_token_id)
    processor = make_processor(assets, config.data)

    base_shardings = parallel.param_shardings(abstract_params(cfg, run.param_dtype), mesh)
    base = model_init.load_base_params(config.model, cfg, run.param_dtype, base_shardings, config.seed)
    lora_shardings = None
    if config.lora.rank > 0:
        lora_shardings = parallel.param_shardings(
            lora_lib.abstract_lora(cfg, config.lora.rank, lora_targets(config), dtype=config.train.master_dtype),
            mesh)
    frozen, trainable = split_trainable(base, config, cfg, lora_shardings)
    del base

    tx, schedule = make_optimizer(config.train.learning_rate, total_steps,
                                  warmup_fraction=config.train.warmup_fraction,
                                  weight_decay=config.train.weight_decay, b1=config.train.adam_b1,
                                  b2=config.train.adam_b2, eps=config.train.adam_eps,
                                  clip_norm=config.train.clip_norm)
    state_shardings = jitted.state_shardings(tx, trainable, mesh, config.seed)
    state = jitted.jit_create_state(tx, config.seed, state_shardings)(trainable)
    del trainable

    checkpointer = RunCheckpointer(os.path.join(workdir, CHECKPOINT_DIR), max_to_keep=config.checkpoint.keep,
                                   async_save=config.checkpoint.async_save)
    metrics_log = MetricsLog(workdir, enabled=is_main)
    data_state = None
    start_step = 0
    latest = checkpointer.latest_step()
    if latest is not None:
        abstract_state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        del state
        state, data_state, _ = checkpointer.restore(latest, abstract_state)
        start_step = int(state.step)
        metrics_log.truncate_after(start_step)
        console(f"{stage}: resumed from {workdir}/{CHECKPOINT_DIR}/{latest} (step {start_step})")

    spec = BatchSpec.from_config(config.data, num_chunks=chunks, local_shards=local_shards,
                                 rows_per_shard=rows_per_shard, pad_id=tokenizer.pad_id,
                                 patch_dim=cfg.vision.patch_dim, merge_size=cfg.vision.spatial_merge_size,
                                 position_mode=run.positions)
    iterator = build_train_iterator(config.data, spec, tokenizer, processor, seed=config.seed,
                                    process_index=jax.process_index(), process_count=jax.process_count())
    if data_state is not None:
        iterator.set_state(data_state)

    step_fn = jitted.jit_train_step(config, cfg, run, mesh, tx=tx, schedule=schedule, shardings=state_shardings,
                                    pixel_table=media.normalize_table(processor))

    tasks = eval_tasks(config.eval.files)
    encoder = None
    if tasks:
        # the weights being trained, on the training mesh; evaluation takes no gradient: no dropout, no remat
        eval_run = run.replace(remat="none", lora=None if run.lora is None else dataclasses.replace(run.lora,
                                                                                                   dropout=0.0))
        mesh_encoder = MeshEncoder(cfg, eval_run, tokenizer, processor, mesh, batch_axes=parallel.BATCH_AXES,
                                   max_text_tokens=config.data.max_text_tokens)

        def encoder(items):
            return mesh_encoder.encode(full_params(frozen, state.trainable, run), items,
                                       batch_size=config.eval.batch_size)

    def run_eval(step: int) -> dict[str, float]:
        results = evaluate_tasks(encoder, tasks, config)
        if results:
            metrics_log.write(step, results)
            metrics_log.flush()
            console(f"{stage} eval step {step}: " + " ".join(f"{k} {v:.4f}" for k, v in sorted(results.items())))
        return results

    meta = {"config": _config_json(config), "model_config": cfg.to_hf_dict(), "stage": stage,
            "total_steps": total_steps, "process_count": jax.process_count()}
    first_eval = run_eval(start_step) if (tasks and config.eval.at_start and start_step == 0) else {}

    put = functools.partial(parallel.host_to_global, mesh=mesh, batch_axis=1)
    batches = prefetch_to_device(iterator, put, size=config.train.prefetch_batches)
    throughput = Throughput()
    progress = Progress(total_steps, stage, unit="steps", done=start_step, enabled=is_main, stream=sys.stdout,
                        every_s=0.0, redraw=False)  # a line per logged step, in a terminal too
    report = functools.partial(_report, config=config, total_steps=total_steps, throughput=throughput,
                               progress=progress, metrics_log=metrics_log, stage=stage, iterator=iterator)
    pending = None  # (step, device metrics, host info) of the previous step: read one step late
    last_metrics: dict[str, float] = {}
    bad_total = 0
    try:
        for step in range(start_step, total_steps):
            device_batch, host_batch, data_state = next(batches)
            state, metrics = step_fn(state, frozen, device_batch)
            bad_total += len(host_batch.bad_records)
            if pending is not None:
                last_metrics = report(pending)
            # examples/tokens of the whole global batch, counted when the step is reported
            pending = (step + 1, metrics, host_batch.num_examples * jax.process_count(),
                       host_batch.num_tokens * jax.process_count())
            done = step + 1
            if config.checkpoint.every_steps and done % config.checkpoint.every_steps == 0 and done < total_steps:
                checkpointer.save(done, state, data_state, meta)
            if tasks and config.eval.every_steps and done % config.eval.every_steps == 0 and done < total_steps:
                run_eval(done)
        if pending is not None:
            last_metrics = report(pending)
        if checkpointer.latest_step() != total_steps:  # a rerun after the final save has nothing to add
            checkpointer.save(total_steps, state, data_state, meta, force=True)
        checkpointer.wait()
    finally:
        batches.close() if hasattr(batches, "close") else None
        iterator.close()
        metrics_log.flush()

    final_eval = run_eval(total_steps) if (tasks and config.eval.at_end) else {}
    params = merged_params(frozen, state.trainable, run, base_shardings)
    lora_meta = ({"rank": config.lora.rank, "alpha": config.lora.alpha, "targets": list(lora_targets(config)),
                  "merged": True} if run.lora is not None else None)
    orbax_model.save_model_dir(model_dir, params, cfg, assets_from=assets, lora_meta=lora_meta,
                               source=f"{workdir} ({stage}, {total_steps} steps)",
                               extra={"finished": True, "steps": total_steps, "stage": stage,
                                      "final_metrics": last_metrics, "eval": final_eval}, overwrite=True)
    checkpointer.close()
    metrics_log.close()
    console(f"{stage}: done; final model in {model_dir}")
    return {"model_dir": model_dir, "steps": total_steps, "final_metrics": last_metrics, "eval_start": first_eval,
            "eval_end": final_eval, "bad_records": bad_total, "data_stats": _stats(iterator)}


def _report(pending, *, config, total_steps: int, throughput: Throughput, progress: Progress,
            metrics_log: MetricsLog, stage: str, iterator) -> dict[str, float]:
    """Reads the previous step's metrics (one step late), checks them, logs them."""
    step, device_metrics, examples, tokens = pending
    values = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    throughput.add(examples, tokens)
    if values.pop("finite") < 1.0:
        message = (f"{stage} step {step}: non-finite loss or gradient (loss {values.get('loss')}, grad norm "
                   f"{values.get('grad_norm')}); the update was not applied")
        if config.train.nonfinite == "stop":
            raise TrainingError(message + "; stopping. The last checkpoint holds the last good state; lower the "
                                "learning rate or set train.nonfinite=skip to skip such steps.")
        logging.warning(message + "; skipped (train.nonfinite=skip)")
        values["skipped_nonfinite"] = 1.0
    log_every = max(1, config.train.log_every)
    if step % log_every == 0 or step == total_steps:
        record = {**values, **throughput.read(), **_stats(iterator)}
        metrics_log.write(step, record)
        metrics_log.flush()
        progress.update(step - progress.done, **console_fields(record))
    return values


def _stats(iterator) -> dict[str, float]:
    stats = getattr(iterator, "stats", None)
    if not stats:
        return {}
    out = {}
    for key in ("records_seen", "bad", "dropped"):
        if key in stats:
            out[f"data/{key}"] = float(stats[key])
    return out


def evaluate_tasks(encoder, tasks, config) -> dict[str, float]:
    from unite_jax.eval.evaluate import evaluate

    results = {}
    for name, queries, candidates in tasks:
        scores = evaluate(encoder, queries, candidates, batch_size=config.eval.batch_size)
        for key, value in scores.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                results[f"eval/{name}/{key}"] = float(value)
    return results


def _finished(model_dir: str, total_steps: int) -> bool:
    meta_path = os.path.join(model_dir, orbax_model.MODEL_META)
    if not os.path.exists(meta_path):
        return False
    try:
        with open(meta_path) as f:
            extra = json.load(f).get("extra") or {}
    except (OSError, ValueError):
        return False
    return bool(extra.get("finished")) and int(extra.get("steps", -1)) == total_steps

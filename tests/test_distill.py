"""Distillation: the closed form's optimality, SGD, E2E, checkpoints, resume, NaN."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from distill_job import tiny_samples
from helpers import kill_and_resume_job, randomize_lowrank

import caprese
from caprese.capture import capture
from caprese.distillation import DistillSettings, TrainingDiverged, distill
from caprese.distillation.checkpoint import CheckpointClock, load_checkpoint
from caprese.distillation.layerwise import collect_stats, residual_report, solve_closed_form
from caprese.distillation.settings import TrainSettings
from caprese.distillation.stats import RegressionStats
from caprese.distillation.trainer import lr_factor, train
from caprese.samples import collate


def test_closed_form_recovers_a_planted_low_rank_map():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(500, 24, generator=generator, dtype=torch.float64)
    planted = torch.randn(24, 3, generator=generator, dtype=torch.float64) @ torch.randn(
        3, 24, generator=generator, dtype=torch.float64)
    stats = RegressionStats.zeros(24)
    stats.add(x, x @ planted)
    left, right = solve_closed_form(stats, rank=3, ridge=1e-10)
    torch.testing.assert_close((left @ right).double(), planted, rtol=1e-4, atol=1e-4)
    assert stats.relative_error(left.double() @ right.double()) < 1e-4


def test_closed_form_is_the_best_rank_r_fit_on_captured_data():
    """Against an explicit reduced-rank regression on stored activations (fp64)."""
    model = caprese.attach(tiny_model("llama"), caprese.CapreseConfig(method="griffin", rank=4))
    samples = tiny_samples(12)
    xs, ys = {}, {}

    def keep(index, x, y):
        xs.setdefault(index, []).append(x.double())
        ys.setdefault(index, []).append(y.double())

    stats = {i: RegressionStats.zeros(32) for i in caprese.blocks(model)}
    for start in range(0, 12, 4):
        batch = collate(samples[start:start + 4])
        capture(model, batch, keep)
        capture(model, batch, lambda i, x, y: stats[i].add(x, y))
    for index in caprese.blocks(model):
        x, y = torch.cat(xs[index]), torch.cat(ys[index])
        assert stats[index].tokens == len(x) == sum(len(s.input_ids) - s.boundary
                                                     for s in samples)
        torch.testing.assert_close(stats[index].xx, x.t() @ x, rtol=1e-5, atol=1e-4)
        left, right = solve_closed_form(stats[index], rank=4, ridge=1e-9)
        ours = (y - x @ left.double() @ right.double()).norm() / y.norm()
        full = torch.linalg.lstsq(x, y).solution  # Eckart-Young on the fitted values X W
        u, s, vh = torch.linalg.svd(x @ full, full_matrices=False)
        best = (y - (u[:, :4] * s[:4]) @ vh[:4]).norm() / y.norm()
        assert ours <= best + 1e-6
        assert abs(stats[index].relative_error(left @ right) - float(ours)) < 1e-5
        assert ours < 1.0  # the method's error really shrinks


def original_mlp_inputs(base, batch) -> dict[int, torch.Tensor]:
    """Each layer's MLP input in a plain forward of the unattached model."""
    seen = {}
    handles = [layer.mlp.register_forward_pre_hook(
        lambda module, args, i=i: seen.__setitem__(i, args[0]))
        for i, layer in enumerate(base.model.layers)]
    with torch.no_grad():
        base.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    for handle in handles:
        handle.remove()
    return seen


def test_capture_sees_the_original_models_inputs():
    base = tiny_model("gemma2")
    model = caprese.attach(copy.deepcopy(base), caprese.CapreseConfig(method="cats", rank=4))
    caprese.blocks(model)[0].R.data.normal_()  # a trained path must not leak into capture
    batch = collate(tiny_samples(3))
    seen = original_mlp_inputs(base, batch)
    captured = {}
    capture(model, batch, lambda i, x, y: captured.__setitem__(i, x))
    for index, x in captured.items():
        torch.testing.assert_close(x, seen[index][batch.continuation])


def test_capture_stops_after_the_last_caprese_block():
    """Layers above the last Caprese block feed no regression: they never run, and the
    captured data equal what a pass through the whole stack reports."""
    base = tiny_model("llama")
    model = caprese.attach(copy.deepcopy(base), caprese.CapreseConfig(method="griffin", rank=4))
    assert sorted(caprese.blocks(model)) == [0, 1]  # GRIFFIN's default: the first half
    batch = collate(tiny_samples(3))
    ran = []
    handles = [layer.register_forward_hook(lambda module, args, out, i=i: ran.append(i))
               for i, layer in enumerate(model.model.layers)]
    captured = {}
    capture(model, batch, lambda i, x, y: captured.__setitem__(i, (x, y)))
    assert ran == [0] and sorted(captured) == [0, 1]  # layer 1 stops inside its MLP
    seen = original_mlp_inputs(base, batch)
    for index, (x, _) in captured.items():
        torch.testing.assert_close(x, seen[index][batch.continuation])
    ran.clear()
    with torch.no_grad():  # the stop is gone afterwards: a normal forward runs every layer
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    assert ran == [0, 1, 2, 3]
    for handle in handles:
        handle.remove()


def test_a_batch_on_another_device_keeps_its_continuation_mask_there():
    """The E2E and fidelity losses index GPU tensors with this mask (found on CUDA: it was
    built on the CPU); the meta device stands in for a GPU here."""
    batch = collate(tiny_samples(3), pad_id=0)
    moved = batch.to("meta")
    assert moved.continuation.device.type == "meta"
    assert torch.equal(batch.continuation, batch.to("cpu").continuation)


@pytest.mark.parametrize("method", ["griffin", "cats"])
def test_captured_targets_are_the_dropped_mlp_output_per_sample(method):
    """Y = FF(x) - FFhat(x) at continuation rows, each sample masked by its own prompt's
    selection: recomputed here from the full-batch activations and the method's mask."""
    base = tiny_model("llama")
    model = caprese.attach(copy.deepcopy(base), caprese.CapreseConfig(method=method, rank=4))
    batch = collate(tiny_samples(4, seed=3))
    inputs = original_mlp_inputs(base, batch)
    captured = {}
    capture(model, batch, lambda i, x, y: captured.__setitem__(i, y))
    prompt = batch.attention_mask.bool() & ~batch.continuation
    assert captured.keys() == caprese.blocks(model).keys()
    for index, block in caprese.blocks(model).items():
        mlp = block.mlp
        x = inputs[index]
        act, up = mlp.act_fn(mlp.gate_proj(x)), mlp.up_proj(x)
        hidden = act * up
        mask = block.method.keep_mask(block.method.select(act, hidden, prompt), act)
        expected = (hidden - act * mask * up)[batch.continuation]
        expected = expected @ mlp.down_proj.weight.t()
        assert expected.abs().sum() > 0
        torch.testing.assert_close(captured[index], expected)


def layer_errors(model, samples):
    stats = collect_stats(model, samples, 4, Path("/nonexistent"), "unused", checkpoint_every=10**9)
    return residual_report(model, stats, {})


@pytest.fixture
def no_checkpoints(monkeypatch):
    monkeypatch.setattr("caprese.distillation.layerwise.save_checkpoint", lambda *a, **k: None)
    monkeypatch.setattr("caprese.distillation.layerwise.load_checkpoint", lambda *a, **k: None)


def test_sgd_lowers_the_loss_and_closed_form_is_at_least_as_good(tmp_path, no_checkpoints):
    samples = tiny_samples(32)
    base = tiny_model("mistral")
    sgd_model = caprese.attach(copy.deepcopy(base), caprese.CapreseConfig(rank=4, layers=[0, 1]))
    closed = caprese.attach(copy.deepcopy(base), caprese.CapreseConfig(rank=4, layers=[0, 1]))
    distill(sgd_model, samples, tmp_path / "sgd", DistillSettings(
        solver="sgd", sgd_epochs=6, sgd_batch=8, sgd_lr=3e-2))
    distill(closed, samples, tmp_path / "closed", DistillSettings(solver="closed_form"))
    stage = json.loads((tmp_path / "sgd" / "stages" / "layerwise" / "stage.json").read_text())
    assert set(stage["timings"]) == {"stats_s", "sgd_s", "held_out_stats_s"}
    assert [row["layer"] for row in stage["layers"]] == [0, 1]
    log = [json.loads(line) for line in open(tmp_path / "sgd" / "run_log.jsonl")]
    losses = [r["loss"] for r in log if r["stage"] == "sgd"]
    assert sum(losses[-4:]) < 0.95 * sum(losses[:4])
    for sgd_row, closed_row in zip(layer_errors(sgd_model, samples), layer_errors(closed, samples),
                                   strict=True):
        assert sgd_row["train_after"] < 0.995  # before: 1.0 (the method alone)
        assert closed_row["train_after"] <= sgd_row["train_after"] + 1e-6


def test_e2e_lowers_the_loss_and_leaves_base_weights_bit_identical(tmp_path):
    model = caprese.attach(tiny_model("qwen3"), caprese.CapreseConfig(method="griffin", rank=4))
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    summary = distill(model, tiny_samples(32), tmp_path, DistillSettings(
        stages=("e2e",), e2e_epochs=6, e2e_batch=8, e2e_lr=3e-3, gradient_checkpointing=True))
    losses = summary["stages"]["e2e"]["losses"]
    assert losses[-1] < 0.9 * losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert not model.training
    reloaded = caprese.load(tiny_model("qwen3"), tmp_path)
    for index, block in caprese.blocks(reloaded).items():
        assert torch.equal(block.R, caprese.blocks(model)[index].R)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_kl_objective_is_the_kl_of_the_models_own_logits_in_any_chunking(family, monkeypatch):
    """Gemma 2 soft-caps its logits; the loss must use the logits generate() samples from."""
    from caprese.distillation import e2e
    from caprese.phases import split, teacher

    model = caprese.attach(tiny_model(family, final_logit_softcapping=0.5)
                           if family == "gemma2" else tiny_model(family),
                           caprese.CapreseConfig(method="cats", rank=4))
    randomize_lowrank(model)
    batch = collate(tiny_samples(3, seed=5), 0)
    inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    with torch.no_grad(), teacher(model):
        log_p = model(**inputs).logits[batch.continuation].float().log_softmax(-1)
    with torch.no_grad(), split(model, batch.boundary):
        log_q = model(**inputs).logits[batch.continuation].float().log_softmax(-1)
    expected = float((log_p.exp() * (log_p - log_q)).sum())

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        total, tokens = e2e.e2e_loss(model, "kl")(batch, 0.5)
        block = caprese.blocks(model)[1]
        return total, tokens, block.L.grad.clone(), block.R.grad.clone()

    total, tokens, grad_l, grad_r = loss_and_grads()
    assert total == pytest.approx(expected, rel=1e-5) and expected > 1e-4
    assert tokens == int(batch.continuation.sum()) > 7
    monkeypatch.setattr(e2e, "LOGIT_ROWS", 7)  # several chunks, the same sum and gradient
    chunked, _, chunked_l, chunked_r = loss_and_grads()
    # fp32 sums over the vocabulary in another order: 2e-6 apart on an AVX2 CPU
    assert chunked == pytest.approx(total, rel=1e-5)
    assert torch.allclose(chunked_l, grad_l, rtol=1e-5, atol=1e-7)
    assert torch.allclose(chunked_r, grad_r, rtol=1e-5, atol=1e-7)


def test_kl_objective_lowers_the_kl_more_than_mse_does(tmp_path):
    from caprese.evaluate.fidelity import fidelity

    samples = tiny_samples(32)
    scores = {}
    for objective in ("mse", "kl"):
        model = caprese.attach(tiny_model("qwen2"), caprese.CapreseConfig("griffin", rank=4))
        before = fidelity(model, samples, progress=False, layer_errors=False)["kl"]
        distill(model, samples, tmp_path / objective, DistillSettings(
            stages=("e2e",), e2e_epochs=6, e2e_batch=8, e2e_lr=1e-2, e2e_objective=objective))
        scores[objective] = fidelity(model, samples, progress=False, layer_errors=False)["kl"]
    assert scores["kl"] < 0.85 * before and scores["kl"] < scores["mse"]
    with pytest.raises(ValueError, match="e2e_objective"):
        DistillSettings(e2e_objective="mae")


def test_warmup_is_two_percent_of_long_runs_and_a_floor_of_steps_in_short_ones():
    long = [lr_factor(step, 3750, 0.02) for step in range(3750)]
    assert long[0] == pytest.approx(1 / 75) and long[74] == 1.0 and long[76] < 1.0
    assert long[-1] == pytest.approx(1 / 3675)
    short = [lr_factor(step, 38, 0.02) for step in range(38)]  # 2% would be one step
    assert short[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0]) and max(short[6:]) < 1.0
    assert [lr_factor(step, 3, 0.02) for step in range(3)] == pytest.approx([1 / 3, 2 / 3, 1])
    assert lr_factor(0, 38, 0.02, min_warmup_steps=0) == 1.0  # the floor can be switched off
    with pytest.raises(ValueError, match="warmup"):
        DistillSettings(warmup=2.0)


def test_on_step_sees_every_step_after_its_update(tmp_path):
    from caprese.distillation.e2e import e2e_loss

    model = caprese.attach(tiny_model("llama"), caprese.CapreseConfig(method="cats", rank=4))
    seen = []
    block = caprese.blocks(model)[0]
    settings = TrainSettings("e2e", 1e-3, 2, 4, 2, 0.02, 10**6, 0)
    losses = train(model, tiny_samples(8), e2e_loss(model), settings, tmp_path,
                   on_step=lambda step: seen.append((step, float(block.R.detach().abs().sum()))))
    assert [step for step, _ in seen] == list(range(1, len(losses) + 1)) == [1, 2, 3, 4]
    assert seen[0][1] > 0  # R starts at zero: the first update is already visible


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    model = caprese.attach(tiny_model("llama"), caprese.CapreseConfig(method="cats", rank=4))
    calls = {"n": 0}

    def loss_fn(batch, scale):
        calls["n"] += 1
        block = caprese.blocks(model)[0]
        loss = (block.R.sum() - 1.0).pow(2)
        (loss * scale).backward()
        return (float("nan") if calls["n"] > 3 else loss.item()), 1

    settings = TrainSettings("sgd", lr=1e-2, epochs=1, batch_size=2, micro_batch=2,
                             checkpoint_every=1)
    with pytest.raises(TrainingDiverged, match="loss is nan at step 3.*--resume"):
        train(model, tiny_samples(20), loss_fn, settings, tmp_path)
    tensors, meta = load_checkpoint(tmp_path / "checkpoints", "sgd")
    assert meta["step"] == 3
    assert torch.isfinite(tensors["layers.0.R"]).all()


def test_existing_run_needs_resume_and_same_settings(tmp_path):
    model = caprese.attach(tiny_model("llama"), caprese.CapreseConfig(rank=4))
    distill(model, tiny_samples(8), tmp_path, DistillSettings())
    with pytest.raises(ValueError, match="already holds a run: pass --resume"):
        distill(model, tiny_samples(8), tmp_path, DistillSettings())
    with pytest.raises(ValueError, match="its run used other settings"):
        distill(model, tiny_samples(8), tmp_path, DistillSettings(ridge=1e-3), resume=True)
    with pytest.raises(ValueError, match="unknown solver"):
        DistillSettings(solver="adam")


def test_a_resumed_run_may_change_only_its_checkpoint_cadence(tmp_path):
    model = caprese.attach(tiny_model("llama"), caprese.CapreseConfig(rank=4))
    distill(model, tiny_samples(8), tmp_path, DistillSettings())
    distill(model, tiny_samples(8), tmp_path, DistillSettings(
        checkpoint_every=7, checkpoint_minutes=0.5), resume=True)
    with pytest.raises(ValueError, match=r"other settings \(\['settings'\]\)"):
        distill(model, tiny_samples(8), tmp_path, DistillSettings(
            checkpoint_every=7, capture_batch=3), resume=True)
    with pytest.raises(ValueError, match="checkpoint_minutes must be a positive number"):
        DistillSettings(checkpoint_minutes=0)


def test_the_checkpoint_clock_saves_by_count_at_the_end_and_by_time(monkeypatch):
    now = [0.0]
    monkeypatch.setattr("caprese.distillation.checkpoint.time.monotonic", lambda: now[0])
    clock = CheckpointClock(every=5, minutes=10)
    assert [done for done in range(1, 13) if clock.due(done, 12)] == [5, 10, 12]
    clock = CheckpointClock(every=50, minutes=10)
    saved = []
    for done in range(1, 13):
        now[0] += 4 * 60  # four minutes per unit of work
        if clock.due(done, 12):
            saved.append(done)
    assert saved == [3, 6, 9, 12]


def test_statistics_killed_between_timed_checkpoints_resume_to_the_same_sums(tmp_path,
                                                                            monkeypatch):
    """A pass slower than its batch cadence still saves (here after every batch, minutes ~ 0)
    and a resumed pass reads the saved sums back and ends with the uninterrupted ones."""
    model = caprese.attach(tiny_model("llama"), caprese.CapreseConfig(method="cats", rank=4))
    samples = tiny_samples(20)
    straight = collect_stats(model, samples, 4, tmp_path / "straight", "stats", 10**9, 0, 1e-9)
    import caprese.distillation.layerwise as layerwise

    real_capture, calls = layerwise.capture, []

    def dies_on_the_fourth_batch(*args):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        real_capture(*args)

    monkeypatch.setattr(layerwise, "capture", dies_on_the_fourth_batch)
    with pytest.raises(KeyboardInterrupt):
        collect_stats(model, samples, 4, tmp_path / "killed", "stats", 10**9, 0, 1e-9)
    _, meta = load_checkpoint(tmp_path / "killed" / "checkpoints", "stats")
    assert meta["batches"] == 3
    calls.clear()
    resumed = collect_stats(model, samples, 4, tmp_path / "killed", "stats", 10**9, 0, 1e-9)
    assert len(calls) == 2  # only the batches after the checkpoint ran again
    for index, stats in straight.items():
        assert torch.equal(stats.xx, resumed[index].xx) and torch.equal(stats.xy, resumed[index].xy)
        assert stats.tokens == resumed[index].tokens


def test_kill_and_resume_ends_with_the_same_adapter(tmp_path):
    def killed_during_e2e(killed):  # after a few E2E steps: the layer-wise stage is done
        assert (killed / "stages" / "layerwise" / "adapter.safetensors").exists()

    straight, killed = kill_and_resume_job(tmp_path, [], '"e2e"', 3, "0.05", killed_during_e2e)
    for name in ("adapter.safetensors", "stages/layerwise/adapter.safetensors"):
        assert (killed / name).read_bytes() == (straight / name).read_bytes()


def test_fidelity_is_perfect_at_density_one_and_improves_with_distillation(tmp_path):
    from caprese.evaluate.fidelity import fidelity

    samples, held_out = tiny_samples(48), tiny_samples(12, seed=7)
    exact = caprese.attach(tiny_model("llama"), caprese.CapreseConfig(density=1.0, rank=4))
    result = fidelity(exact, held_out, progress=False)
    assert result["kl"] < 1e-9 and result["top1"] == 1.0
    assert result["ppl_teacher"] == pytest.approx(result["ppl_student"], rel=1e-6)
    assert result["tokens"] == sum(len(s.input_ids) - s.boundary - 1 for s in held_out)

    model = caprese.attach(tiny_model("llama"), caprese.CapreseConfig(method="cats", rank=8))
    before = fidelity(model, held_out, progress=False)
    assert before["kl"] > 1e-4
    assert all(r["method_rel_error"] == r["caprese_rel_error"] for r in before["layers"])
    distill(model, samples, tmp_path, DistillSettings(solver="closed_form"))
    after = fidelity(model, held_out, progress=False)
    assert after["kl"] < before["kl"]
    assert before["ppl_teacher"] == pytest.approx(after["ppl_teacher"], rel=1e-6)
    assert all(r["caprese_rel_error"] < r["method_rel_error"] for r in after["layers"])


def test_fidelity_in_chunks_of_positions_equals_one_chunk(monkeypatch):
    """Logits are taken a few positions at a time (memory); the totals must not change."""
    from caprese import divergence
    from caprese.evaluate.fidelity import fidelity

    held_out = tiny_samples(6, seed=3)
    model = caprese.attach(tiny_model("llama"), caprese.CapreseConfig(method="cats", rank=8))
    whole = fidelity(model, held_out, progress=False, layer_errors=False)
    monkeypatch.setattr(divergence, "SCORED_ROWS", 5)
    chunked = fidelity(model, held_out, progress=False, layer_errors=False)
    assert whole["tokens"] > 5 * 4
    assert chunked["tokens"] == whole["tokens"] and chunked["top1"] == whole["top1"]
    for key in ("kl", "ppl_teacher", "ppl_student"):
        # The LM head's product over 5 rows may round differently from one over all rows
        # (another GEMM kernel; 1.5e-6 apart on an AMD Zen 5 CPU), and the KL is a small
        # difference of log-probabilities: 1e-5, as for the E2E objective's chunking test.
        assert chunked[key] == pytest.approx(whole[key], rel=1e-5)


def test_load_weights_continues_a_saved_adapter_and_names_what_differs(tmp_path):
    trained = caprese.attach(tiny_model("llama"), caprese.CapreseConfig(method="cats", rank=4))
    randomize_lowrank(trained)
    caprese.save(trained, tmp_path / "layerwise")
    fresh = caprese.attach(tiny_model("llama"), caprese.CapreseConfig(method="cats", rank=4))
    caprese.load_weights(fresh, tmp_path / "layerwise")
    for index, block in caprese.blocks(fresh).items():
        assert torch.equal(block.R, caprese.blocks(trained)[index].R)
    other = caprese.attach(tiny_model("llama"), caprese.CapreseConfig(method="cats", rank=8))
    with pytest.raises(ValueError, match="rank=4"):
        caprese.load_weights(other, tmp_path / "layerwise")

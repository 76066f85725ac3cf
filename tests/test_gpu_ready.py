"""What a GPU run relies on, shown on a CPU: one learning rate per ResNet stage, frozen stages'
BatchNorm statistics untouched, the schedule the presets' comments state, compile-safe
parameter names, one download per machine, the global batch, worker augmentation seeds,
strict local weights, and training-step code that never reads a device value back."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from competition import augment, batch_size, data, folds, models, optim, runtime, train, train_data
from competition.config import CONFIG_DIR, resolve
from competition.files import CompetitionError
from competition.specs import train_spec


# ---------------------------------------------------------------------------- fine-tuning mechanics

def test_layer_decay_gives_each_resnet_stage_one_learning_rate():
    cfg = resolve(3, None, [])
    spec = train_spec(cfg)
    model = models.build_model("resnet50", 100)
    opt = optim.make_optimizer(model, spec.optim)
    optim.make_scheduler(opt, spec.replace(warmup_epochs=0).schedule, spec.loop.epochs)  # applies each lr_scale
    stage_lr = {}
    for g in opt.param_groups:
        for p in g["params"]:
            name = next(n for n, q in model.named_parameters() if q is p)
            stage_lr.setdefault(models.stage_of(name), set()).add(round(g["lr"], 9))
    expected = {"head": 0, "layer4": 1, "layer3": 2, "layer2": 3, "layer1": 4, "stem": 5}
    assert set(stage_lr) == set(expected)
    for stage, k in expected.items():
        assert stage_lr[stage] == {round(cfg["lr"] * cfg["layer_decay"] ** k, 9)}, stage
    # norms and biases still get no weight decay
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decay[id(model.layer1[0].bn1.weight)] == 0.0 and decay[id(model.layer1[0].conv1.weight)] > 0


def test_layer_decay_needs_a_resnet():
    cfg = resolve(1, None, ["layer_decay=0.7"])
    with pytest.raises(CompetitionError, match="ResNet stages"):
        optim.make_optimizer(models.build_model("simple_cnn", 10), train_spec(cfg).optim)


def test_frozen_stages_keep_their_running_statistics():
    model = models.resnet18(10, stem="cifar")
    models.set_trainable(model, models.unfrozen_prefixes({0: ["head"], 1: ["layer4"]}, 1))
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    model.train()
    assert models.frozen_norms_to_eval(model) > 0
    model(torch.randn(8, 3, 32, 32) * 3 + 1)
    after = model.state_dict()
    for k, v in before.items():
        moved = not torch.equal(after[k], v)
        assert moved == k.startswith("layer4"), k  # only the open stage's statistics follow the data


def walk(cfg: dict, steps: int = 50) -> np.ndarray:
    """The LR each update of the whole run uses (the loop's clock: step_update after each update)."""
    opt = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=cfg["lr"])
    sched = optim.make_scheduler(opt, train_spec(cfg).schedule, cfg["epochs"])
    lrs = []
    for epoch in range(cfg["epochs"]):
        for i in range(steps):
            lrs.append(opt.param_groups[0]["lr"])
            sched.step_update(epoch + (i + 1) / steps)
    return np.array(lrs)


def test_part3_schedule_is_what_its_comments_say():
    cfg = resolve(3, None, [])
    steps = 50
    lrs = walk(cfg, steps)
    assert len(lrs) == cfg["epochs"] * steps == 10 * steps
    assert lrs[0] < 0.01 * cfg["lr"]  # warmup starts low
    assert lrs[steps] == pytest.approx(cfg["lr"])  # warmup ends at the peak after epoch 1
    jumps = [(i / steps) for i in np.flatnonzero(np.diff(lrs) > 0) + 1 if i > steps]
    assert jumps == [4.0]  # one restart, at the start of epoch 5: 1 + 3 | + 6
    assert lrs[4 * steps] == pytest.approx(cfg["lr"] * cfg["cycle_decay"])  # half the peak
    assert lrs[4 * steps - 1] < cfg["min_lr"] + 1e-3 * cfg["lr"]  # cycle 1 ended at min_lr
    assert lrs[-1] < cfg["min_lr"] + 1e-3 * cfg["lr"]  # and so does the run


PRESETS = [(None, p.stem) for p in sorted(CONFIG_DIR.glob("*.yaml")) if p.stem != "base"] + [(2, "demo"), (3, "demo")]


@pytest.mark.parametrize("part,preset", PRESETS)
def test_every_cosine_preset_ends_its_run_at_min_lr(part, preset):
    cfg = resolve(part, [preset], [])
    if cfg["sched"] != "cosine":
        pytest.skip("not a cosine schedule")
    lrs = walk(cfg, 20)
    assert lrs[-1] <= (cfg["min_lr"] or 0.0) + 0.01 * cfg["lr"], "the run stops mid-cycle"


def test_presets_do_not_augment_twice():
    for part in (2, 3):
        cfg = resolve(part, None, [])
        assert cfg["cpu_aug"] == "none" and cfg["strong_aug_epoch"] is None  # flip/shift once, on the device
        assert not (cfg["mixup"] and cfg["cutmix"])


# ---------------------------------------------------------------------------- global batch, launch

def test_batch_size_is_global_and_must_split():
    spec = train_spec(resolve(1, None, ["batch_size=256", "grad_accum=2"]))
    assert train_data.process_batch(spec, 256, 1) == 128
    assert train_data.process_batch(spec, 256, 8) == 16
    with pytest.raises(CompetitionError, match="multiple of 6"):
        train_data.process_batch(spec, 256, 3)
    mixed = spec.replace(mixup=0.2, grad_accum=1)
    with pytest.raises(CompetitionError, match="odd"):
        train_data.process_batch(mixed, 24, 8)


def test_the_dataset_is_loaded_once_per_machine(monkeypatch):
    acc = runtime.make_accelerator("no")
    inside = []
    real_first, real_load = acc.main_process_first, data.load
    state = {"in": False}

    class Guard:
        def __enter__(self):
            state["in"] = True
            return real_first().__enter__()

        def __exit__(self, *exc):
            state["in"] = False

    monkeypatch.setattr(acc, "main_process_first", lambda: Guard())
    monkeypatch.setattr(data, "load", lambda *a, **k: inside.append(state["in"]) or real_load(*a, **k))
    train_data.TrainData(train_spec(resolve(1, ["demo"], ["ood_check=0"])), acc)
    assert inside == [True]


# ---------------------------------------------------------------------------- worker augmentation seeds

def augmented_batches(seed: int, epochs: int = 2) -> list[list[np.ndarray]]:
    """Every batch of `epochs` epochs of a training loader (cpu_aug basic, 2 workers) whose rows
    are all the same image, so any difference between items is augmentation."""
    torch.manual_seed(seed)
    acc = runtime.make_accelerator("no")
    cfg = resolve(1, ["demo"], ["cpu_aug=basic", "workers=2", "batch_size=8", "ood_check=0", f"seed={seed}"])
    td = train_data.TrainData(train_spec(cfg), acc)
    td.train_rows = np.zeros(32, np.int64)
    return [[x.numpy() for x, _, _ in td.loader(epoch, 32)[0]] for epoch in range(epochs)]


def test_workers_and_epochs_draw_their_own_augmentations(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (e0, e1), again = augmented_batches(0), augmented_batches(0)
    assert len(e0) == 4  # batches 0, 2 from worker 0; 1, 3 from worker 1
    assert not np.array_equal(e0[0], e0[1]), "the two workers repeat each other"
    assert not np.array_equal(e0[0], e1[0]), "epoch 2 repeats epoch 1"
    for a, b in zip(e0 + e1, again[0] + again[1]):
        np.testing.assert_array_equal(a, b)  # and a rerun at the same seed is the same


def test_each_process_seeds_its_workers_apart(monkeypatch):
    seen = []

    class Info:
        seed, dataset = 1234, type("D", (), {"transform": type("T", (), {"set_random_seed": lambda s, v: seen.append(v)})()})()

    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: Info)
    train_data.seed_worker(0, process=0)
    train_data.seed_worker(0, process=1)
    assert len(set(seen)) == 2


# ---------------------------------------------------------------------------- local weights are strict

def test_a_weights_file_with_other_keys_names_them(tmp_path, random_resnet50):
    sd = torch.load(random_resnet50)  # a ResNet-50's state dict with the ImageNet head (conftest.py), read only
    renamed = tmp_path / "renamed.pth"
    torch.save({f"encoder.{k}": v for k, v in sd.items()}, renamed)
    with pytest.raises(CompetitionError, match=r"renamed.pth.*318 tensors are not in it: bn1.bias.*not in the model: encoder.bn1"):
        models.resnet50(10, weights=str(renamed))
    partial = tmp_path / "partial.pth"
    torch.save({k: v for k, v in sd.items() if not k.startswith("layer4.2.")}, partial)
    with pytest.raises(CompetitionError, match=r"layer4\.2\."):
        models.resnet50(10, weights=str(partial))
    # wrapped the usual ways (a 'state_dict' entry, DDP's module. prefix) it loads
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, wrapped)
    torch.testing.assert_close(models.resnet50(10, weights=str(wrapped)).conv1.weight, sd["conv1.weight"])


# ---------------------------------------------------------------------------- device-side augmentation

def test_a_training_step_never_reads_a_device_value_back():
    """On the meta device every value is unknown: a Python `if t.any()`, `.item()` or
    `nonzero()` raises, so passing here means the GPU step never waits on the host for them
    (AugMix is torchvision's and is left out)."""
    cfg = resolve(3, None, ["noise_blur=0.5", "random_erasing=0.5", "mixup=0.2", "cutmix=1.0", "augmix=false"])
    x8 = torch.empty(16, 32, 32, 3, dtype=torch.uint8, device="meta")
    prep = {"mean": [0.5] * 3, "std": [0.25] * 3, "channels_last": True}
    spec = train_spec(cfg)
    x = augment.train_input(x8, spec.augment, prep, 64)
    batch_aug = augment.BatchAugment(spec.augment, 10, prep["std"], spec.optim.label_smoothing)
    out, target = batch_aug(x, torch.zeros(16, dtype=torch.long, device="meta"))
    assert out.shape == (16, 3, 64, 64) and target.shape == (16, 10) and out.device.type == "meta"


def test_batched_random_erasing():
    torch.manual_seed(0)
    x = torch.full((2000, 3, 32, 32), 7.0)
    out = augment.RandomErase(0.5)(x)
    erased = out != 7.0
    per_image = erased.any(3).any(2).any(1)
    assert 0.45 < per_image.float().mean() < 0.55
    boxes = erased[per_image, 0]
    area = boxes.float().mean((1, 2))
    assert area.min() > 0 and area.max() <= 1 / 3 + 0.05
    rows, cols = boxes.any(2), boxes.any(1)  # one rectangle each: its rows x its columns, nothing else
    assert torch.equal(boxes, rows[:, :, None] & cols[:, None, :])
    assert torch.equal(erased.all(1), erased.any(1))  # every channel of an erased pixel
    assert math.isclose(out[erased].std().item(), 1.0, rel_tol=0.05)  # normal noise in normalised units


@pytest.mark.parametrize("path", ["masked", "indexed"])
def test_noise_blur_paths_pick_the_same_shares(path):
    """The GPU path (masked, sync-free) and the CPU path (indexed) noise half the picked images
    and blur the other half; the rest are untouched."""
    torch.manual_seed(0)
    x = torch.zeros(4000, 3, 8, 8)
    x[:, :, 3:5, 3:5] = 1.0  # a bright square: blur spreads it, noise breaks the flat background
    out = getattr(augment.NoiseBlur(0.6, [1.0, 1.0, 1.0], noise_std=0.1, blur_sigma=1.0), path)(x)
    changed = (out != x).flatten(1)
    noisy = changed[:, :8].any(1)  # the first row is flat: only noise changes it
    blurred = changed.any(1) & ~noisy
    assert 0.27 < noisy.float().mean() < 0.33 and 0.27 < blurred.float().mean() < 0.33
    assert out[~changed.any(1)].eq(x[~changed.any(1)]).all()


def test_parameter_groups_keep_timms_order_so_older_optimizer_checkpoints_load():
    from timm.optim._param_groups import param_groups_weight_decay

    model = models.build_model("simple_cnn", 10)
    ours = optim.param_groups(model, train_spec(resolve(1, None, [])).optim)
    theirs = param_groups_weight_decay(model, 5e-4)
    assert [[id(p) for p in g["params"]] for g in ours] == [[id(p) for p in g["params"]] for g in theirs]
    assert [g["weight_decay"] for g in ours] == [g["weight_decay"] for g in theirs]


def test_a_torchvision_file_without_batch_counters_loads(tmp_path, random_resnet50):
    sd = {k: v for k, v in torch.load(random_resnet50).items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "legacy.pth"
    torch.save(sd, path)
    torch.testing.assert_close(models.resnet50(10, weights=str(path)).conv1.weight, sd["conv1.weight"])


def test_the_throughput_step_builds_its_optimizer_before_compile(monkeypatch):
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **k: real(m, backend="eager"))
    cfg = resolve(2, None, ["compile=true", "layer_decay=0.7", "batch_size=4", "augmix=false", "jsd=0",
                            "model_args.channels=[8,8,8,8]"])
    ips, _ = batch_size.step_throughput(train_spec(cfg), steps=1, warmup=1)
    assert ips > 0


def test_augmix_calls_stay_few_on_large_batches(monkeypatch):
    from torchvision.transforms import v2

    calls = []
    real = v2.AugMix.__call__
    monkeypatch.setattr(v2.AugMix, "__call__", lambda self, x: calls.append(len(x)) or real(self, x))
    augment.augmix_views(torch.zeros(512, 8, 8, 3, dtype=torch.uint8), views=1)
    assert len(calls) == 16 and set(calls) == {32}
    calls.clear()
    augment.augmix_views(torch.zeros(256, 8, 8, 3, dtype=torch.uint8), views=1)
    assert len(calls) == 16 and set(calls) == {16}  # the CPU preset's batch: groups of 16 as before


def test_an_optimizer_checkpoint_of_other_groups_is_one_clear_error(tmp_path, monkeypatch):
    folds.write_folds(folds.folds_frame(data.load_digits().labels), tmp_path / "folds" / "digits.csv")
    args = ["--part", "1", "--preset", "demo", "epochs=2", "train_subset=128", "model_args.widths=[8,16,16]",
            "model_args.hidden=16", "batch_size=64", f"folds_dir={tmp_path / 'folds'}", f"models_dir={tmp_path / 'm'}"]
    train.main(args + ["stop_after=1"])
    real = optim.param_groups
    monkeypatch.setattr(optim, "param_groups", lambda model, cfg: [{"params": [p for g in real(model, cfg)
                                                                               for p in g["params"]]}])
    with pytest.raises(CompetitionError, match="other parameter groups"):
        train.main(args + ["--resume"])


def test_auto_precision_is_bf16_only_where_the_device_has_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("COMPETITION_CPU_BF16", "1")
    assert runtime.mixed_precision("auto") == "bf16"
    monkeypatch.setenv("COMPETITION_CPU_BF16", "0")  # as conftest sets it for every test
    assert runtime.mixed_precision("auto") == "no"
    monkeypatch.delenv("COMPETITION_CPU_BF16")  # then the CPU's own instructions decide
    for avx512_bf16, amx, want in ((True, False, "bf16"), (False, True, "bf16"), (False, False, "no")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert runtime.mixed_precision("auto") == want
    assert runtime.mixed_precision("bf16") == "bf16"  # asked for by name: kept, native or not


def test_stages_of_other_precisions_run_in_one_process():
    """A bf16 training then an fp32 prediction in one process (selftrain, the benchmarks):
    Accelerate alone refuses the second Accelerator."""
    for precision, dtype in (("no", torch.float32), ("bf16", torch.bfloat16), ("no", torch.float32)):
        acc = runtime.make_accelerator(precision)
        assert acc.mixed_precision == precision
        with acc.autocast():
            assert torch.nn.Linear(4, 2)(torch.ones(1, 4)).dtype == dtype

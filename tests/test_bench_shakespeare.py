"""bench/shakespeare.py keys every cached artefact by the corpus: two corpora never share a run, and --force
trains again. The xlab subprocesses are replaced by a fake that records what each step read."""
import copy
import hashlib
import importlib.util
import json
import math
import os
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
FIT_START = 1_000_000.0  # the fake clock of a fit launch (time.time in the bench module)


@pytest.fixture
def bench(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_shakespeare", REPO / "bench" / "shakespeare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "WORK", tmp_path / "work")
    monkeypatch.setattr(module, "RESULTS", tmp_path / "results")
    calls, paths = [], []

    def fake_xlab(args, log, env):
        """Stands in for `xlab.py`: trains a real char tokenizer; 'fit' writes a checkpoint naming the train file's
        content; 'validate' reports a loss that says whether that checkpoint was trained on the held-out file's
        corpus (0.5) or on another one (9.0)."""
        from xlabml.tokenizer import TokenizerTrainer
        command = args[0]
        configs = [args[i + 1] for i, a in enumerate(args) if a == "-c"]
        config = yaml.safe_load(Path(configs[-1]).read_text())
        splits = config["data"]["splits"]
        calls.append((command, splits["train"]["path"]))
        paths.append(env["PYTHONPATH"])
        if command == "train_tokenizer":
            text = Path(splits["train"]["path"]).read_text()
            TokenizerTrainer({"model_type": "char"}).train([text], config["data"]["num_tokens"],
                                                           config["data"]["tokenizer_path"])
        elif command == "fit":
            ckpt = Path(config["trainer"]["callbacks"][0]["init_args"]["dirpath"]) / "final.ckpt"
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            every = config["trainer"].get("val_check_interval")
            if every:  # in-fit validation: val_loss 3.0, 2.0, 1.0, ... nats/token, 10 s apart on the fit's clock
                from torch.utils.tensorboard import SummaryWriter
                logger = config["trainer"]["logger"]["init_args"]
                writer = SummaryWriter(str(Path(logger["save_dir"]) / logger["version"]))
                for i, step in enumerate(range(every, config["trainer"]["max_steps"] + 1, every)):
                    # logged at one step less, as Lightning does for a validation inside the fit
                    writer.add_scalar("val_loss", 3.0 - i, step - 1, walltime=FIT_START + 10.0 * (i + 1))
                writer.close()
            ckpt.write_text(hashlib.sha256(Path(splits["train"]["path"]).read_bytes()).hexdigest())
        elif command == "validate":
            ckpt = next(a.split("=", 1)[1] for a in args if a.startswith("--ckpt_path="))
            trained_on = Path(ckpt).read_text()
            heldout = Path(splits["val"]["path"])
            same = hashlib.sha256((heldout.parent / "train.txt").read_bytes()).hexdigest() == trained_on
            return 1.0, f"val_loss │ {0.5 if same else 9.0}\n"
        return 1.0, ""

    monkeypatch.setattr(module, "xlab", fake_xlab)
    module.calls, module.paths = calls, paths
    return module


def _corpus(path: Path, line: str) -> Path:
    path.write_text((line + "\n") * 200, encoding="utf-8")
    return path


def _run(bench, corpus: Path, *flags: str) -> dict:
    args, extra = bench.parse_args(["--corpus", str(corpus), "--steps", "10", "--reference-steps", "0", *flags])
    split = bench.split_corpus(corpus, bench.WORK)
    return bench.run_one(args, bench.resolve_settings(args), split, extra, quiet=True)


def test_two_corpora_never_share_a_run(bench, tmp_path):
    a = _corpus(tmp_path / "a.txt", "to be or not to be, that is the question")
    b = _corpus(tmp_path / "b.txt", "a fortune cookie says: you will write many tests")
    result_a = _run(bench, a)
    result_b = _run(bench, b)
    assert result_a["run"] != result_b["run"]
    # each checkpoint was scored on the corpus it was trained on (the fake's 0.5, not 9.0)
    assert result_a["val_loss_per_token"] == 0.5 and result_b["val_loss_per_token"] == 0.5
    assert [c for c, _ in bench.calls].count("fit") == 2
    # asking for A again serves A's cached result, not B's
    assert _run(bench, a)["run"] == result_a["run"]
    assert [c for c, _ in bench.calls].count("fit") == 2


def test_runs_read_their_own_corpus_split_and_tokenizer(bench, tmp_path):
    a = _corpus(tmp_path / "a.txt", "abc abc abc abc")
    b = _corpus(tmp_path / "b.txt", "xyz xyz xyz xyz")
    split_a = bench.split_corpus(a, bench.WORK)
    split_b = bench.split_corpus(b, bench.WORK)
    assert split_a["digest"] != split_b["digest"]
    assert split_a["train"] != split_b["train"] and split_a["train"].read_text().startswith("abc")
    args, _ = bench.parse_args([])
    s = bench.resolve_settings(args)
    assert bench.tokenizer_file(s, split_a)[0] != bench.tokenizer_file(s, split_b)[0]
    assert bench.run_name(s, [], None, split_a["digest"]) != bench.run_name(s, [], None, split_b["digest"])
    # the published table belongs to the default corpus only
    assert bench.results_dir(split_a) == bench.RESULTS / split_a["digest"]


def test_force_trains_again(bench, tmp_path):
    a = _corpus(tmp_path / "a.txt", "once more unto the breach, dear friends")
    first = _run(bench, a)
    again = _run(bench, a, "--force")
    assert again["run"] == first["run"]
    assert [c for c, _ in bench.calls].count("fit") == 2  # retrained, not re-scored
    assert json.loads((bench.WORK / "runs" / first["run"] / "result.json").read_text())["bpc"] == again["bpc"]


def test_recipe_flags_reach_the_config_and_neutral_values_keep_old_run_keys(bench, tmp_path):
    """Each recipe flag becomes its YAML (optimizer, schedule, z-loss, soft-cap, length warmup), the ablation rows'
    settings are the same as the flags', and a run at the neutral values keeps the key it had before the flags."""
    flags = ["--optimizer", "muon", "--muon-lr", "0.03", "--schedule", "wsd", "--z-loss", "1e-4", "--softcap", "15",
             "--seq-warmup", "500", "--seq-start", "16", "--arch", "modern", "--tokenizer", "bpe"]
    args, _ = bench.parse_args(flags)
    s = bench.resolve_settings(args)
    assert bench.optimizer_config(s) == {"class_path": "xlabml.optim.MuonAdamW", "init_args": {
        "lr": 0.03, "weight_decay": 0.0, "adam_lr": s["lr"], "adam_betas": [0.9, s["beta2"]],
        "adam_weight_decay": s["weight_decay"]}}
    schedule = bench.scheduler_config(s, 2000)
    assert schedule["class_path"] == "xlabml.schedules.WSD" and schedule["init_args"]["decay_fraction"] == 0.2
    assert bench.recipe_model(s) == {"z_loss": 1e-4, "logit_softcap": 15.0}
    assert (s["seq_warmup"], s["seq_start"]) == (500, 16)
    # an ablation row and the same flags are one run
    row = dict(bench.ABLATION)["base + Muon (matrices) / AdamW"]
    args, _ = bench.parse_args(["--arch", "modern", "--tokenizer", "bpe", "--vocab", "1024", "--lr", "2e-3",
                                "--min-lr", "1e-4", "--optimizer", "muon"])
    plain, _ = bench.parse_args([])
    assert bench.run_name(bench.resolve_settings(args), []) == bench.run_name(bench.resolve_settings(plain, row), [])
    # neutral values: the key is computed as if the recipe settings did not exist
    s = bench.resolve_settings(plain)
    old = {k: v for k, v in s.items() if k not in bench.NEUTRAL}
    name = bench.run_name(s, [], digest="d")
    key = json.dumps({k: old[k] for k in sorted(old)}, sort_keys=True, default=str) + " corpus=d"
    assert name.endswith(hashlib.sha256(key.encode()).hexdigest()[:8])


def test_xlab_steps_see_this_checkout_first_and_the_callers_pythonpath(bench, tmp_path, monkeypatch):
    # packages installed with `pip install --target DIR` and PYTHONPATH=DIR (as on a bare GPU machine) must stay
    # importable in the xlab subprocesses
    monkeypatch.setenv("PYTHONPATH", "/opt/extra-site")
    _run(bench, _corpus(tmp_path / "a.txt", "to be or not to be"))
    assert bench.paths and all(p.split(os.pathsep) == [str(REPO), "/opt/extra-site"] for p in bench.paths)


def test_screen_compares_each_row_with_the_shipped_row_at_the_same_seeds(bench, tmp_path):
    """--screen reads only this checkout's runs, and a row's 'vs base' is the median of same-seed differences
    (a seed the base row has not run is left out of it)."""
    corpus = _corpus(tmp_path / "c.txt", "now is the winter of our discontent")
    split = bench.split_corpus(corpus, bench.WORK)
    args, extra = bench.parse_args(["--corpus", str(corpus), "--seeds", "3", "--threads", "1"])
    (base_label, base), (row_label, row) = bench.SCREEN[0], bench.SCREEN[3]
    shipped_label, shipped = next((label, o) for label, o in bench.SCREEN if "(shipped now)" in label)
    rows = {base_label: base, row_label: row, shipped_label: shipped}
    planted = {(base_label, 1): 2.10, (base_label, 2): 2.20, (row_label, 1): 2.05, (row_label, 2): 2.25,
               (row_label, 3): 1.00,  # seed 3 has no base run to compare with
               (shipped_label, 1): 2.00}
    for (label, seed), bpc in planted.items():
        path = bench.result_path(args, rows[label], seed, extra, split)[1]
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"bpc": bpc, "seed": seed, "run": path.parent.name}))
    done = bench.screen(args, split, extra, table_only=True)
    assert not bench.calls  # nothing trained
    assert {seed: r["bpc"] for seed, r in done[row_label].items()} == {1: 2.05, 2: 2.25, 3: 1.00}
    summary = json.loads(bench.write_screen(done, split).with_suffix(".json").read_text())
    assert summary[row_label]["median"] == 2.05
    assert summary[row_label]["delta"] == pytest.approx(((2.05 - 2.10) + (2.25 - 2.20)) / 2)
    assert summary[base_label]["delta"] is None
    assert summary[row_label]["vs_shipped"] == pytest.approx(2.05 - 2.00)  # the one seed both have
    assert summary[shipped_label]["vs_shipped"] is None and summary[base_label]["vs_shipped"] == pytest.approx(0.10)
    assert all(not runs for label, runs in done.items() if label not in rows)


def test_shipped_config_reports_its_own_settings_and_is_the_screened_winner(bench):
    """`-c` reports what conf/extra/shakespeare.yaml sets (not the preset's values), and those settings are the
    screening row its comment names (Muon 0.02 with weight decay 0.2 on the matrices, AdamW 3e-3 with weight
    decay 0.4 on the rest, on the shipped base)."""
    args, _ = bench.parse_args(["-c"])
    s = bench.resolve_settings(args)
    best = bench.load_best_config()["model"]
    opt = best["optimizer"]["init_args"]
    assert (s["optimizer"], s["muon_lr"], s["muon_weight_decay"], s["lr"], s["weight_decay"], s["beta2"]) == (
        "muon", opt["lr"], opt["weight_decay"], opt["adam_lr"], opt["adam_weight_decay"], opt["adam_betas"][1])
    assert s["min_lr"] == pytest.approx(1e-4, rel=1e-9) and s["dropout"] == best["dropout"] == 0.0
    row = dict(bench.SCREEN)["lr 3e-3 + wd 0.4 + Muon 0.02 with weight decay 0.2 (shipped now)"]
    plain, _ = bench.parse_args([])
    r = bench.resolve_settings(plain, row)
    assert bench.optimizer_config(r) == best["optimizer"]  # the same optimizer, argument for argument
    assert (r["lr"], r["weight_decay"], r["beta2"], r["min_lr"], r["warmup"]) == \
        (s["lr"], s["weight_decay"], s["beta2"], s["min_lr"], s["warmup"])
    assert bench.ARCHS[r["arch"]]["head_qk"] == best["head_qk"] and r["vocab"] == s["vocab"]
    assert bench.scheduler_config(r, 2000)["init_args"]["min_lr_ratio"] == \
        best["scheduler"]["init_args"]["min_lr_ratio"]


def test_eval_every_gives_the_heldout_curve_and_when_it_reaches_the_reference(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(bench.time, "time", lambda: FIT_START)
    a = _corpus(tmp_path / "a.txt", "to be or not to be, that is the question")
    args, _ = bench.parse_args(["--corpus", str(a), "--steps", "10", "--eval-every", "4"])
    s = bench.resolve_settings(args)
    split = bench.split_corpus(a, bench.WORK)
    config = bench.run_config(s, split, tmp_path / "run", tmp_path / "tok.model", {}, 100)
    assert {k: config["trainer"][k] for k in ("limit_val_batches", "val_check_interval", "check_val_every_n_epoch")} \
        == {"limit_val_batches": 1.0, "val_check_interval": 4, "check_val_every_n_epoch": None}
    assert config["data"]["eval_step_size"] == 1.0 and config["data"]["step_size"] == 1  # scored once
    plain = _run(bench, a)
    result = _run(bench, a, "--eval-every", "4")
    assert result["run"] != plain["run"] and "heldout_curve" not in plain
    per_nat = result["heldout_targets"] / result["heldout_chars"] / math.log(2)
    # steps 4 and 8 (10 is not a multiple of 4), val_loss 3.0 and 2.0, 10 and 20 s after the launch
    assert result["heldout_curve"] == [[4, round(3.0 * per_nat, 4), 10.0], [8, round(2.0 * per_nat, 4), 20.0]]
    assert bench.reached(result["heldout_curve"], 3.5) == {"step": 8, "bpc": round(2.0 * per_nat, 4), "s": 20.0}
    assert bench.reached(result["heldout_curve"], 2.0) is None
    with pytest.raises(ValueError, match="--eval-every -1: expected 0"):
        bench.resolve_settings(bench.parse_args(["--eval-every", "-1"])[0])


def test_gpu_config_is_the_measured_gpu_budget_run(bench):
    """conf/extra/shakespeare-gpu.yaml holds the settings of the GPU-budget runs in bench/results/gpu-h100/
    (`--preset nanogpt-gpu --arch modern-headqk --tokenizer bpe --vocab 1024 --lr 2e-3 --steps 250 --eval-every 25`)."""
    args, _ = bench.parse_args(["--preset", "nanogpt-gpu", "--arch", "modern-headqk", "--tokenizer", "bpe",
                                "--vocab", "1024", "--lr", "2e-3", "--steps", "250", "--eval-every", "25"])
    s = bench.resolve_settings(args)
    run = bench.run_config(s, {"train": "T", "heldout": "H"}, Path("run"), Path("tok.model"), {"model_type": "bpe"},
                           1024)
    conf = yaml.safe_load((REPO / "conf" / "extra" / "shakespeare-gpu.yaml").read_text())
    assert conf["seed_everything"] == run["seed_everything"]
    trainer = ("max_steps", "precision", "gradient_clip_val", "val_check_interval", "check_val_every_n_epoch",
               "limit_val_batches", "num_sanity_val_steps")
    assert {k: conf["trainer"][k] for k in trainer} == {k: run["trainer"][k] for k in trainer}
    data = ("num_tokens", "tokenizer_train_args", "seq_len", "step_size", "eval_step_size", "batch_size")
    assert {k: conf["data"][k] for k in data} == {k: run["data"][k] for k in data}
    run_model = copy.deepcopy(run["model"])
    run_model["scheduler"]["init_args"]["total_steps"] = None  # the file's schedule spans trainer.max_steps
    assert conf["model"] == run_model

"""Issue 6's check: 50 config reloads (valid light, valid heavy, invalid) while files stream through
the real daemon. Every record ends in results xor errors, once; light reloads never load a model;
invalid ones leave the old config in force; each result's `_config_hash` names a config that
really produced it (its outputs are what that config's models and settings make)."""

from __future__ import annotations

import copy
import threading
import time
from pathlib import Path

import yaml

from tests.harness import (
    DaemonProcess,
    config_in_force,
    digest_of,
    dump,
    jsonl,
    model_loads,
    reloads,
    wait_for,
    write_atomic,
    write_config,
)
from tests.stages_for_tests import RELOAD_ENV

RECORDS_PER_FILE = 40


def base_config(models: dict[str, Path]) -> dict:
    return {
        "steps": [
            {
                "type": "Test",
                "name": "Tagger",
                "config": {
                    "model_path": str(models["m1"]),
                    "suffix": "",
                    "batch_size": 4,
                    "max_wait_ms": 5,
                    "workers_per_device": 2,
                },
            },
            {
                "type": "Test",
                "name": "Tagger",
                "config": {
                    "model_path": str(models["m2"]),
                    "output_key": "tag2",
                    "suffix": "",
                    "batch_size": 3,
                    "max_wait_ms": 5,
                    "sleep_s": 0.002,
                },
            },
        ],
        "daemon": {"inbox": "inbox", "outbox": "outbox", "settle_ms": 50, "rescan_s": 1.0, "metrics": {"port": 0}},
    }


def light(config: dict, n: int, models: dict[str, Path]) -> str:
    step0, step1 = config["steps"][0]["config"], config["steps"][1]["config"]
    variant = n % 6
    if variant == 0:
        step0["suffix"] = f"-p{n}"  # a prompt-like setting
    elif variant == 1:
        step1["suffix"] = f"-q{n}"
    elif variant == 2:
        step0["batch_size"] = step0["batch_size"] % 7 + 1
        step1["max_wait_ms"] = step1["max_wait_ms"] % 20 + 1
    elif variant == 3:
        step0["prep_workers"] = step0.get("prep_workers", 2) % 3 + 1
    elif variant == 4:
        config["daemon"]["log_level"] = "DEBUG" if config["daemon"].get("log_level") != "DEBUG" else "INFO"
        config["daemon"]["settle_ms"] = 50 + n % 30
        config["daemon"]["ignore"] = [f"*.skip{n}"]
    else:
        return f"# reload {n}: only this comment changed\n" + dump(config)
    return dump(config)


def heavy(config: dict, n: int, models: dict[str, Path]) -> str:
    steps = config["steps"]
    variant = n % 4
    if variant == 0:
        current = steps[0]["config"]["model_path"]
        steps[0]["config"]["model_path"] = str(models["m3"] if current == str(models["m1"]) else models["m1"])
    elif variant == 1:
        steps[0]["config"]["workers_per_device"] = 1 if steps[0]["config"]["workers_per_device"] == 2 else 2
    elif variant == 2:  # the step graph changes: a third step comes or goes
        if len(steps) == 2:
            steps.append(
                {
                    "type": "Test",
                    "name": "Tagger",
                    "config": {"model_path": str(models["m2"]), "output_key": "tag3", "suffix": f"-r{n}"},
                }
            )
        else:
            steps.pop()
    else:  # a model change and a light change on the same step
        current = steps[1]["config"]["model_path"]
        steps[1]["config"]["model_path"] = str(models["m3"] if current == str(models["m2"]) else models["m2"])
        steps[1]["config"]["suffix"] = f"-h{n}"
    return dump(config)


def invalid(config: dict, n: int, models: dict[str, Path]) -> tuple[str, bool]:
    """A bad file, and whether applying it loads a model (a failed load puts the old one back)."""
    variant = n % 6
    if variant == 0:
        config["steps"][1]["config"]["temperature"] = 0.7  # not a key of this stage
    elif variant == 1:
        config["steps"][0]["config"]["batch_size"] = 0
    elif variant == 2:
        return dump(config) + "steps: [unclosed\n", False
    elif variant == 3:
        config["daemon"]["inbox"] = "elsewhere"  # cannot change live
    elif variant == 4:
        config["steps"][0]["config"]["model_path"] = str(models["m1"].parent / "missing-model.txt")
        return dump(config), True
    else:
        config["daemon"]["metrics"]["port"] = 1  # cannot change live
    return dump(config), False


def expected_output(config: dict, index: int, models: dict[str, Path]) -> tuple[str, str]:
    step = config["steps"][index]["config"]
    names = {str(path): path.read_text().strip() for path in models.values()}
    return step.get("output_key", "tag"), names[step["model_path"]] + step.get("suffix", "")


def test_fifty_reloads_while_files_stream(tmp_path: Path):
    models = {name: tmp_path / f"{name}.txt" for name in ("m1", "m2", "m3")}
    for name, path in models.items():
        path.write_text(f"model-{name}\n")
    config = base_config(models)
    path = write_config(tmp_path, config)
    valid = {digest_of(path.read_text()): copy.deepcopy(config)}
    kinds = ["light", "heavy", "invalid", "light", "heavy", "invalid", "light", "heavy", "invalid", "light"] * 5
    log: list[tuple[int, str, str, float, float]] = []  # (n, kind, expected digest, loads before, after)

    with DaemonProcess(path, env=RELOAD_ENV) as daemon:
        dropped: list[str] = []
        streaming = threading.Event()
        streaming.set()

        def stream() -> None:
            n = 0
            while streaming.is_set():
                job = f"j{n:03d}"
                rows = [{"id": f"{job}-{i}", "text": f"row {i}"} for i in range(RECORDS_PER_FILE)]
                daemon.drop_text(f"{job}.jsonl", jsonl(rows))
                dropped.append(job)
                n += 1
                time.sleep(0.25)

        feeder = threading.Thread(target=stream, daemon=True)
        feeder.start()
        in_force = digest_of(path.read_text())
        started = time.monotonic()
        try:
            for n, kind in enumerate(kinds):
                current = copy.deepcopy(valid[in_force])
                loads_may_change = kind == "heavy"
                if kind == "light":
                    text = light(current, n, models)
                elif kind == "heavy":
                    text = heavy(current, n, models)
                else:
                    text, loads_may_change = invalid(current, n, models)
                before_text = daemon.metrics()
                ok, errors = reloads(daemon)
                write_atomic(path, text)
                wait_for(
                    lambda ok=ok, errors=errors: sum(reloads(daemon)) == ok + errors + 1,
                    30,
                    f"reload {n} ({kind})",
                    daemon,
                )
                after_text = daemon.metrics()
                new_ok, new_errors = reloads(daemon)
                if kind == "invalid":
                    assert (new_ok, new_errors) == (ok, errors + 1), f"reload {n}: {kind} was not refused"
                else:
                    assert (new_ok, new_errors) == (ok + 1, errors), (
                        f"reload {n}: {kind} was refused:\n{daemon.log()[-3000:]}"
                    )
                    in_force = digest_of(text)
                    valid[in_force] = yaml.safe_load(text)
                assert config_in_force(after_text) == in_force, f"reload {n} ({kind}): wrong config in force"
                loads = (model_loads(before_text), model_loads(after_text))
                if not loads_may_change:
                    assert loads[0] == loads[1], f"reload {n} ({kind}) loaded a model: {loads}"
                log.append((n, kind, in_force, *loads))
        finally:
            streaming.clear()
            feeder.join()
        reload_seconds = time.monotonic() - started

        for job in dropped:
            state = daemon.wait_for_job(job, timeout=120)
            assert state["state"] == "done", state
        results = {job: daemon.results(job) for job in dropped}
        errors = {job: daemon.errors(job) for job in dropped}
        final_log = daemon.log()
        assert daemon.stop() == 0

    assert sum(1 for entry in log if entry[1] == "heavy" and entry[4] > entry[3]) >= 8, log
    assert len(dropped) >= 10, "the files did not stream during the reloads"
    assert "Traceback" not in final_log, final_log[-4000:]
    for job in dropped:
        expected = {f"{job}-{i}" for i in range(RECORDS_PER_FILE)}
        result_ids = [r["id"] for r in results[job]]
        error_ids = [e["id"] for e in errors[job]]
        assert len(result_ids) == len(set(result_ids)), f"{job}: duplicated results"
        assert len(error_ids) == len(set(error_ids)), f"{job}: duplicated errors"
        assert not set(result_ids) & set(error_ids), f"{job}: a record in both results and errors"
        assert set(result_ids) | set(error_ids) == expected, f"{job}: records lost"
        assert not errors[job], f"{job}: {errors[job][:3]}"
        for line in results[job]:
            by_step = line.get("_config_hash_by_step") or {}
            digests = {int(label.split("_")[1]): d for label, d in by_step.items()}
            config = valid.get(line["_config_hash"])
            assert config is not None, f"{job}: {line} names a config never in force"
            for index in range(len(config["steps"]) if not digests else len(digests)):
                step_config = valid[digests[index]] if digests else config
                key, value = expected_output(step_config, index, models)
                assert line.get(key) == value, f"{job}: {line} was not made by config {line['_config_hash']}"
    print(f"50 reloads in {reload_seconds:.1f} s while {len(dropped)} files streamed through")

"""Hot reload, case by case: how a change is classified, SIGHUP, refusals with their key paths,
a heavy rollout while the step's other worker keeps serving, and step-graph rebuilds (stages
kept loaded when they can be, the old graph back when a new stage fails to load)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import yaml

from daemon.config import parse_config
from daemon.service.reload import plan as reload_plan
from daemon.service.reload.plan import Action, plan_reload
from tests.harness import (
    DaemonProcess,
    config_in_force,
    digest_of,
    jsonl,
    metric_value,
    model_loads,
    reloads,
    wait_for,
    write_atomic,
    write_config,
)
from tests.stages_for_tests import RELOAD_ENV, RELOAD_STAGES


def tagger(model: Path, name: str = "Tagger", **settings) -> dict:
    return {"type": "Test", "name": name, "config": {"model_path": str(model), **settings}}


def daemon_section(**settings) -> dict:
    return {"inbox": "inbox", "outbox": "outbox", "settle_ms": 50, "metrics": {"port": 0}, **settings}


# --- classification (no daemon) -----------------------------------------------------------------


@pytest.fixture
def parse(monkeypatch, tmp_path):
    monkeypatch.setenv("REELFLOW_EXTRA_STAGES", RELOAD_STAGES)

    def parse_dict(config: dict):
        return parse_config(yaml.safe_dump(config))

    return parse_dict


def test_plan_classifies_each_kind_of_change(parse, tmp_path: Path):
    m1, m2 = tmp_path / "m1", tmp_path / "m2"
    frames = {"type": "VideoProcessor", "name": "FrameSampler", "config": {"num_frames": 4}}
    base = {"steps": [frames, tagger(m1)], "daemon": daemon_section()}
    old = parse(base)

    def plan(**change):
        new = yaml.safe_load(yaml.safe_dump(base))
        for path, value in change.items():
            node = new
            *parents, last = path.split("__")
            for key in parents:
                node = node[int(key)] if key.isdigit() else node[key]
            node[last] = value
        return plan_reload(old, parse(new))

    light = plan(steps__0__config__num_frames=8, steps__1__config__batch_size=16, steps__1__config__suffix="!")
    assert not light.refused and not light.rebuild
    assert [sorted(c.changed) for c in light.steps] == [["num_frames"], ["batch_size", "suffix"]]
    assert not any(c.reloads_model for c in light.steps)

    heavy = plan(steps__1__config__model_path=str(m2))
    assert heavy.steps[1].reloads_model and not heavy.steps[0].changed

    placement = plan(steps__0__config__workers_per_device=3)
    assert placement.steps[0].changed == {"workers_per_device"} and not placement.steps[0].reloads_model
    assert "workers re-placed" in placement.describe()

    assert plan(steps__1__config__queue_size=8).rebuild == "queue_size of step_1_Test_Tagger"
    assert plan(steps=[tagger(m1), frames]).rebuild == "steps added, removed or reordered"
    assert plan(steps=[frames]).rebuild

    daemon_only = plan(daemon__log_level="DEBUG", daemon__settle_ms=10, daemon__ignore=["*.json"])
    assert daemon_only.daemon_keys == {"log_level", "settle_ms", "ignore"} and not daemon_only.refused

    refused = plan(daemon__inbox="other", daemon__metrics={"port": 9999}, video_key="clip")
    assert [line.split(":")[0] for line in refused.refused] == ["daemon.inbox", "daemon.metrics.port", "video_key"]
    assert all("restart the daemon" in line for line in refused.refused)


def test_a_new_reload_rule_is_one_entry_in_plan_py(parse, tmp_path: Path, monkeypatch):
    """The rules are a table: a key's entry in STEP_RULES changes what its change means."""
    old = parse({"steps": [tagger(tmp_path / "m")], "daemon": daemon_section()})
    new = parse({"steps": [tagger(tmp_path / "m", prep_workers=4)], "daemon": daemon_section()})
    [change] = plan_reload(old, new).steps
    assert change.changed == {"prep_workers"} and change.action == Action.IN_PLACE
    monkeypatch.setitem(reload_plan.STEP_RULES, "prep_workers", Action.RELOAD)
    assert plan_reload(old, new).steps[0].reloads_model
    monkeypatch.setitem(reload_plan.STEP_RULES, "prep_workers", Action.REFUSE)
    [line] = plan_reload(old, new).refused
    assert line.startswith("step_0_Test_Tagger: prep_workers: cannot change while the daemon runs")
    monkeypatch.setitem(reload_plan.STEP_RULES, "prep_workers", Action.SWAP_GRAPH)
    assert plan_reload(old, new).rebuild == "prep_workers of step_0_Test_Tagger"


# --- through the daemon --------------------------------------------------------------------------


def test_sighup_reloads_and_refusals_name_the_key(tmp_path: Path):
    model = tmp_path / "m.txt"
    model.write_text("m\n")
    config = {"steps": [tagger(model, suffix="-a")], "daemon": daemon_section(watch_config=False)}
    path = write_config(tmp_path, config)
    with DaemonProcess(path, env=RELOAD_ENV) as daemon:
        config["steps"][0]["config"]["suffix"] = "-b"
        write_atomic(path, yaml.safe_dump(config))
        time.sleep(1.0)
        assert reloads(daemon) == (0, 0), "watch_config: false, yet the file change reloaded it"
        daemon.process.send_signal(signal.SIGHUP)
        wait_for(lambda: reloads(daemon) == (1, 0), 10, "the SIGHUP reload", daemon)
        assert config_in_force(daemon.metrics()) == digest_of(path.read_text())
        daemon.drop_text("one.jsonl", jsonl([{"id": 1}]))
        daemon.wait_for_job("one")
        assert daemon.results("one")[0]["tag"] == "m-b"

        daemon.process.send_signal(signal.SIGHUP)  # nothing changed: still a reload (systemctl reload)
        wait_for(lambda: reloads(daemon) == (2, 0), 10, "the second SIGHUP", daemon)

        in_force = config_in_force(daemon.metrics())
        config["daemon"]["metrics"]["port"] = 1
        config["daemon"]["outbox"] = "elsewhere"
        config["steps"][0]["config"]["batch_size"] = -1
        write_atomic(path, yaml.safe_dump(config))
        daemon.process.send_signal(signal.SIGHUP)
        wait_for(lambda: reloads(daemon) == (2, 1), 10, "the refused reload", daemon)
        log = daemon.log()
        assert "steps[0].config.batch_size: Input should be greater than or equal to 1 (got -1)" in log
        assert config_in_force(daemon.metrics()) == in_force

        config["steps"][0]["config"]["batch_size"] = 2
        write_atomic(path, yaml.safe_dump(config))
        daemon.process.send_signal(signal.SIGHUP)
        wait_for(lambda: reloads(daemon) == (2, 2), 10, "the refused reload", daemon)
        log = daemon.log()
        assert "daemon.outbox: cannot change while the daemon runs" in log
        assert "daemon.metrics.port: cannot change while the daemon runs" in log
        assert config_in_force(daemon.metrics()) == in_force
        assert daemon.stop() == 0


def test_heavy_rollout_keeps_the_other_worker_serving(tmp_path: Path):
    old, new = tmp_path / "old.txt", tmp_path / "new.txt"
    old.write_text("old\n")
    new.write_text("new\n")
    step = tagger(old, batch_size=2, max_wait_ms=1, sleep_s=0.02, workers_per_device=2)
    config = {"steps": [step], "daemon": daemon_section()}
    path = write_config(tmp_path, config)
    with DaemonProcess(path, env=RELOAD_ENV) as daemon:
        first_digest = digest_of(path.read_text())
        daemon.drop_text("big.jsonl", jsonl([{"id": i} for i in range(600)]))
        wait_for(
            lambda: (
                metric_value(daemon.metrics(), "reelflow_records_total", step="step_0_Test_Tagger", status="ok") > 20
            ),
            20,
            "records flowing",
            daemon,
        )
        step["config"].update(model_path=str(new), load_s=1.5)  # each new load takes 1.5 s
        write_atomic(path, yaml.safe_dump(config))
        written = time.monotonic()
        samples = []  # (records done, model loads) while the rollout runs
        while reloads(daemon)[0] == 0:
            text = daemon.metrics()
            done = metric_value(text, "reelflow_records_total", step="step_0_Test_Tagger", status="ok")
            if time.monotonic() > written + 0.5:  # the watcher has seen the file and the first load began
                samples.append((done, model_loads(text)))
            assert time.monotonic() < written + 30, "the rollout did not finish"
            time.sleep(0.05)
        assert daemon.wait_for_job("big")["state"] == "done"
        results = daemon.results("big")
        assert daemon.stop() == 0
    # While the first worker loaded its new model (loads still 2), the second kept finishing records;
    # then the roles swapped (loads 3).
    during_first = [done for done, loads in samples if loads == 2]
    during_second = [done for done, loads in samples if loads == 3]
    assert len(during_first) > 10 and during_first[-1] - during_first[0] >= 10, samples
    assert len(during_second) > 10 and during_second[-1] - during_second[0] >= 10, samples
    assert sorted(int(r["id"]) for r in results) == list(range(600))
    tags = {(r["tag"], r["_config_hash"]) for r in results}
    assert tags == {("old", first_digest), ("new", digest_of(path.read_text()))}


def test_step_graph_changes_keep_loaded_stages_and_fall_back_on_failure(tmp_path: Path):
    m1, m2 = tmp_path / "m1.txt", tmp_path / "m2.txt"
    m1.write_text("one\n")
    m2.write_text("two\n")
    config = {"steps": [tagger(m1)], "daemon": daemon_section()}
    path = write_config(tmp_path, config)

    def run_job(daemon, name: str) -> list[dict]:
        daemon.drop_text(f"{name}.jsonl", jsonl([{"id": f"{name}{i}"} for i in range(20)]))
        assert daemon.wait_for_job(name)["state"] == "done"
        assert not daemon.errors(name)
        return daemon.results(name)

    def reload_to(daemon, steps: list[dict], expect: tuple[int, int]) -> tuple[float, float]:
        before = model_loads(daemon.metrics())
        config["steps"] = steps
        write_atomic(path, yaml.safe_dump(config))
        wait_for(lambda: reloads(daemon) == expect, 20, f"reload {expect}", daemon)
        return before, model_loads(daemon.metrics())

    with DaemonProcess(path, env=RELOAD_ENV) as daemon:
        assert {r["tag"] for r in run_job(daemon, "a")} == {"one"}
        # Append a step: only the new step loads.
        loads = reload_to(daemon, [tagger(m1), tagger(m2, "Tagger2", output_key="second")], (1, 0))
        assert loads[1] - loads[0] == 1
        assert {(r["tag"], r["second"]) for r in run_job(daemon, "b")} == {("one", "two")}
        # Swap the two steps: both stages are kept (same type, name, model, device); nothing loads.
        loads = reload_to(daemon, [tagger(m2, "Tagger2", output_key="second", suffix="!"), tagger(m1)], (2, 0))
        assert loads[1] == loads[0]
        assert {(r["second"], r["tag"]) for r in run_job(daemon, "c")} == {("two!", "one")}
        kept = config_in_force(daemon.metrics())
        # A new step whose model cannot load: refused, the old graph serves again with the stages
        # it had (they stayed loaded: nothing is loaded back).
        bad = [tagger(m2, "Tagger2", output_key="second"), tagger(m1), tagger(tmp_path / "missing.txt", output_key="x")]
        loads = reload_to(daemon, bad, (2, 1))
        assert loads[1] == loads[0]
        assert config_in_force(daemon.metrics()) == kept
        results = run_job(daemon, "d")
        assert {(r["second"], r["tag"], r["_config_hash"]) for r in results} == {("two!", "one", kept)}
        assert "the new step graph failed to load" in daemon.log()
        assert daemon.stop() == 0

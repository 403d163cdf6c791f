"""Model providers: the OpenAI-compatible client against a local fake server, replay, validation."""
from __future__ import annotations

import json
import socket

import pytest

from orchestrator.engine import EventKind, SwarmOrchestrator
from orchestrator.engine.models import ModelConfig, ModelConfigError, check_reachable, client_factory
from tests.engine.fake_openai import FakeOpenAI

ONE_SHOT_SCRIPT = [
    {"content": "Here is the code.\n\n```python\nprint(6 * 7)\n```", "tool_calls": [{"name": "transfer_to_executor"}]},
    {"tool_calls": [{"name": "execute_code", "arguments": {"code": "print(6 * 7)"}}]},
    {"content": "It printed 42.", "tool_calls": [{"name": "transfer_to_summarizer"}]},
    {"content": "## Summary\nThe answer is 42.", "tool_calls": [{"name": "transfer_to_terminator"}]},
    {"content": "TERMINATE"},
]


async def _run(tmp_path, config: ModelConfig, mode: str = "one_shot"):
    engine = SwarmOrchestrator(task="What is six times seven?", mode=mode, work_dir=tmp_path, model=config)
    events = [event async for event, _ in engine.run()]
    return engine, events


async def test_openai_compatible_endpoint_runs_a_whole_team_streaming(tmp_path):
    """Against a real HTTP server: streamed replies, tool calls, handoffs, code execution, token usage."""
    with FakeOpenAI(ONE_SHOT_SCRIPT) as fake:
        config = ModelConfig(provider="openai", model="fake-model", base_url=fake.base_url, api_key="sk-test")
        await check_reachable(config)
        engine, events = await _run(tmp_path, config)
    assert engine.outcome.status == "completed", events[-1]
    assert all(request["stream"] is True for request in fake.requests)
    assert len(fake.requests) == 5
    assert fake.requests[0]["messages"][0]["role"] == "system" and "engineer" in fake.requests[0]["messages"][0]["content"]
    tool_names = {t["function"]["name"] for t in fake.requests[1]["tools"]}
    assert {"execute_code", "transfer_to_summarizer"} <= tool_names
    result = next(e for e in events if e.kind == EventKind.TOOL_RESULT)
    assert "42" in result.content and "execution succeeded" in result.content
    assert [e.content for e in events if e.kind == EventKind.HANDOFF] == ["executor", "summarizer", "terminator"]
    assert sum(e.prompt_tokens for e in events) == 11 * 5


async def test_per_agent_override_sends_that_agents_model(tmp_path):
    """An agent's override (here a different model name) is what that agent's requests carry."""
    with FakeOpenAI(ONE_SHOT_SCRIPT) as fake:
        config = ModelConfig(
            provider="openai", model="main-model", base_url=fake.base_url, stream=False,
            agents={"executor": {"model": "coder-model"}},
        )
        engine, _ = await _run(tmp_path, config)
    assert engine.outcome.status == "completed"
    assert [r["model"] for r in fake.requests] == ["main-model", "coder-model", "coder-model", "main-model", "main-model"]
    assert all("stream" not in r or r["stream"] is False for r in fake.requests)


@pytest.mark.parametrize(
    ("reply", "cause"),
    [({"status": 500}, "500"), ({"malformed": True}, ""), ({"sleep": 3}, "")],
    ids=["http-500", "malformed-body", "timeout"],
)
async def test_endpoint_failures_end_the_run_with_an_error_event(tmp_path, reply, cause):
    """An HTTP error, a malformed body or a timeout mid-run becomes a failed outcome and an error event."""
    with FakeOpenAI([ONE_SHOT_SCRIPT[0], reply]) as fake:
        config = ModelConfig(provider="openai", model="m", base_url=fake.base_url, timeout=1.0, stream=False)
        engine, events = await _run(tmp_path, config)
    assert engine.outcome.status == "failed"
    assert events[-1].kind == EventKind.ERROR and events[-1].content == engine.outcome.reason
    assert cause in engine.outcome.reason
    assert any(e.kind == EventKind.HANDOFF for e in events)  # what happened before the failure is kept


def test_openai_without_key_or_base_url_is_refused_before_running(tmp_path):
    with pytest.raises(ModelConfigError, match="without an API key: set OPENAI_API_KEY"):
        SwarmOrchestrator(task="t", mode="one_shot", work_dir=tmp_path, model=ModelConfig(provider="openai"))


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (ModelConfig(provider="telepathy"), "Unknown model provider 'telepathy'"),
        (ModelConfig(provider="replay"), "without a script"),
        (ModelConfig(provider="replay", replay_script="/nonexistent.json"), "does not exist"),
        (ModelConfig(agents={"engineer": {"provider": "openai"}}), "override for engineer"),
    ],
)
def test_bad_model_settings_are_clear_errors(config, message):
    with pytest.raises(ModelConfigError, match=message):
        client_factory(config)


async def test_unreachable_endpoint_is_reported_before_the_run():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    config = ModelConfig(provider="openai", base_url=f"http://127.0.0.1:{port}/v1", api_key="k")
    with pytest.raises(ModelConfigError, match="cannot be reached"):
        await check_reachable(config)


def test_settings_from_environment():
    config = ModelConfig.from_env(
        {"CMBAGENT_MODEL_PROVIDER": "openai", "OPENAI_BASE_URL": "http://127.0.0.1:11434/v1", "CMBAGENT_MODEL": "llama3",
         "CMBAGENT_AGENT_MODELS": '{"engineer": {"model": "qwen-coder"}}'}
    )
    assert (config.provider, config.base_url, config.model) == ("openai", "http://127.0.0.1:11434/v1", "llama3")
    assert config.for_agent("engineer").model == "qwen-coder" and config.for_agent("planner").model == "llama3"
    with pytest.raises(ModelConfigError, match="not valid JSON"):
        ModelConfig.from_env({"CMBAGENT_AGENT_MODELS": "{nope"})


async def test_replay_script_drives_the_team(tmp_path):
    """A JSON script of each agent's replies is played back; the same script gives the same transcript."""
    script = {
        "engineer": [{"thought": "Code:\n```python\nprint('replayed')\n```", "calls": [{"name": "transfer_to_executor"}]}],
        "executor": [
            {"calls": [{"name": "execute_code", "arguments": {"code": "print('replayed')"}}]},
            {"thought": "Ran it.", "calls": [{"name": "transfer_to_summarizer"}]},
        ],
        "summarizer": [{"thought": "Done.", "calls": [{"name": "transfer_to_terminator"}]}],
        "terminator": ["TERMINATE"],
    }
    path = tmp_path / "script.json"
    path.write_text(json.dumps(script))
    config = ModelConfig(provider="replay", replay_script=str(path))
    first_engine, first = await _run(tmp_path / "a", config)
    _, second = await _run(tmp_path / "b", config)
    assert first_engine.outcome.status == "completed"
    assert "replayed" in next(e for e in first if e.kind == EventKind.TOOL_RESULT).content
    assert [e.to_dict() for e in first] == [e.to_dict() for e in second]


async def test_cost_comes_from_the_price_table(tmp_path):
    """Each reply is priced by its agent's model from the table; offline replies are free."""
    prices = {"main-model": (1000.0, 2000.0), "coder-model": (10.0, 20.0)}
    with FakeOpenAI(ONE_SHOT_SCRIPT) as fake:
        config = ModelConfig(provider="openai", model="main-model", base_url=fake.base_url, stream=False,
                             agents={"executor": {"model": "coder-model"}}, prices=prices)
        _, events = await _run(tmp_path, config)
    priced = [e for e in events if e.prompt_tokens]
    # The fake server reports 11 prompt and 7 completion tokens per reply.
    by_agent = {e.agent: e.cost_usd for e in priced}
    assert by_agent["engineer"] == pytest.approx((11 * 1000 + 7 * 2000) / 1e6)
    assert by_agent["executor"] == pytest.approx((11 * 10 + 7 * 20) / 1e6)
    assert {e.data["model"] for e in priced} == {"main-model", "coder-model"}
    _, offline = await _run(tmp_path / "offline", ModelConfig(prices=prices))
    assert sum(e.cost_usd for e in offline) == 0 and sum(e.prompt_tokens for e in offline) > 0


def test_price_table_from_environment():
    config = ModelConfig.from_env({"CMBAGENT_PRICES": '{"gpt-4o-mini": [0.15, 0.6]}'})
    assert config.prices == {"gpt-4o-mini": (0.15, 0.6)}
    with pytest.raises(ModelConfigError, match="CMBAGENT_PRICES must be JSON"):
        ModelConfig.from_env({"CMBAGENT_PRICES": '{"m": 3}'})

"""Model providers: offline (default), replay, and any OpenAI-compatible endpoint.

A :class:`ModelConfig` says which provider every agent uses, with per-agent
overrides. :func:`client_factory` validates it (a missing key or model is a
``ModelConfigError`` before anything runs) and returns a function that builds
one model client per agent. :func:`check_reachable` asks an OpenAI-compatible
endpoint for its model list, so an endpoint that is down is reported before the
run starts rather than halfway through it.
"""
from __future__ import annotations

import asyncio
import json
import os
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from autogen_core import FunctionCall
from autogen_core.models import ChatCompletionClient, CreateResult, ModelInfo, RequestUsage

from orchestrator.engine.offline import OFFLINE_MODEL_INFO, OfflineChatCompletionClient

PROVIDERS = ("offline", "replay", "openai")
DEFAULT_OPENAI_MODEL = "gpt-4o-mini"
GENERIC_MODEL_INFO = ModelInfo(
    vision=False, function_calling=True, json_output=False, family="unknown", structured_output=False
)


class ModelConfigError(ValueError):
    """The model settings cannot work; the message says what to fix."""


def _latency(raw: str) -> float:
    try:
        value = float(raw or 0)
    except ValueError as exc:
        raise ModelConfigError(f"CMBAGENT_OFFLINE_LATENCY must be a number of seconds, not {raw!r}.") from exc
    if not 0 <= value <= 60:
        raise ModelConfigError("CMBAGENT_OFFLINE_LATENCY must be between 0 and 60 seconds.")
    return value


@dataclass(frozen=True)
class ModelConfig:
    provider: str = "offline"
    model: str = ""
    base_url: str = ""
    api_key: str = ""
    timeout: float = 60.0
    stream: bool = True
    replay_script: str = ""  # path of a JSON file: {"agent": [reply, ...], ...}
    offline_latency: float = 0.0  # seconds the offline model takes per reply (demos, load tests)
    # Per-agent overrides of any field above, e.g. {"engineer": {"model": "qwen2.5-coder"}}.
    agents: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # USD per million tokens by model name: {"gpt-4o-mini": [input, output]}.
    prices: Mapping[str, tuple[float, float]] = field(default_factory=dict)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> ModelConfig:
        env = os.environ if env is None else env
        agents = env.get("CMBAGENT_AGENT_MODELS", "")
        try:
            agent_overrides = json.loads(agents) if agents else {}
        except ValueError as exc:
            raise ModelConfigError(f"CMBAGENT_AGENT_MODELS is not valid JSON: {exc}") from exc
        prices = _parse_prices(env.get("CMBAGENT_PRICES", ""))
        config = cls(
            provider=env.get("CMBAGENT_MODEL_PROVIDER", "offline"),
            model=env.get("CMBAGENT_MODEL", ""),
            base_url=env.get("OPENAI_BASE_URL", ""),
            api_key=env.get("OPENAI_API_KEY", ""),
            timeout=float(env.get("CMBAGENT_MODEL_TIMEOUT", "60")),
            replay_script=env.get("CMBAGENT_REPLAY_SCRIPT", ""),
            offline_latency=_latency(env.get("CMBAGENT_OFFLINE_LATENCY", "")),
            agents=agent_overrides,
            prices=prices,
        )
        return replace(config, **{k: v for k, v in overrides.items() if v not in (None, "")})

    @property
    def label(self) -> str:
        if self.provider == "offline":
            return "offline model"
        if self.provider == "replay":
            return f"replay of {Path(self.replay_script).name}"
        return f"{self.model or DEFAULT_OPENAI_MODEL} at {self.base_url or 'api.openai.com'}"

    def model_of(self, agent: str) -> str:
        """The model name an agent's replies come from."""
        chosen = self.for_agent(agent)
        if chosen.provider == "openai":
            return chosen.model or DEFAULT_OPENAI_MODEL
        return chosen.provider

    def cost(self, agent: str, prompt_tokens: int, completion_tokens: int) -> float:
        """USD for one reply of ``agent``: offline and replay replies are free; unknown models cost 0."""
        price_in, price_out = self.prices.get(self.model_of(agent), (0.0, 0.0))
        return (prompt_tokens * price_in + completion_tokens * price_out) / 1_000_000

    def for_agent(self, agent: str) -> ModelConfig:
        override = dict(self.agents.get(agent, {}))
        return replace(self, agents={}, **override) if override else self


def _parse_prices(raw: str) -> dict[str, tuple[float, float]]:
    if not raw:
        return {}
    try:
        table = json.loads(raw)
        return {str(model): (float(pair[0]), float(pair[1])) for model, pair in table.items()}
    except (ValueError, TypeError, IndexError, AttributeError) as exc:
        raise ModelConfigError(
            'CMBAGENT_PRICES must be JSON like {"gpt-4o-mini": [0.15, 0.6]} (USD per million input, output tokens).'
        ) from exc


def _load_script(path: str) -> dict[str, list[CreateResult]]:
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelConfigError(f"The replay script {path!r} does not exist.") from exc
    except ValueError as exc:
        raise ModelConfigError(f"The replay script {path!r} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict) or not all(isinstance(v, list) for v in raw.values()):
        raise ModelConfigError(f"The replay script {path!r} must map each agent to a list of replies.")
    return {agent: [_replay_result(agent, i, r) for i, r in enumerate(replies)] for agent, replies in raw.items()}


def _replay_result(agent: str, index: int, reply: Any) -> CreateResult:
    usage = RequestUsage(prompt_tokens=0, completion_tokens=0)
    if isinstance(reply, str):
        return CreateResult(finish_reason="stop", content=reply, usage=usage, cached=False)
    if isinstance(reply, dict) and ("content" in reply or "calls" in reply):
        calls = reply.get("calls")
        if calls:
            content = [
                FunctionCall(id=f"call_{agent}_{index}_{n}", name=c["name"], arguments=json.dumps(c.get("arguments", {})))
                for n, c in enumerate(calls)
            ]
            return CreateResult(finish_reason="function_calls", content=content, usage=usage, cached=False, thought=reply.get("thought"))
        return CreateResult(finish_reason="stop", content=str(reply["content"]), usage=usage, cached=False, thought=reply.get("thought"))
    raise ModelConfigError(f"Reply {index + 1} of {agent} in the replay script is neither text nor {{content|calls}}.")


def client_factory(config: ModelConfig) -> Callable[[str], ChatCompletionClient]:
    """Validate ``config`` and return a builder of one client per agent."""
    if config.provider not in PROVIDERS:
        raise ModelConfigError(f"Unknown model provider {config.provider!r}; use one of: {', '.join(PROVIDERS)}.")
    for agent in config.agents:
        _validate(config.for_agent(agent), where=f"the override for {agent}")
    _validate(config, where="the model settings")
    script = _load_script(config.replay_script) if config.provider == "replay" else {}

    def build(agent: str) -> ChatCompletionClient:
        chosen = config.for_agent(agent)
        if chosen.provider == "offline":
            return OfflineChatCompletionClient(agent, latency=chosen.offline_latency)
        if chosen.provider == "replay":
            from autogen_ext.models.replay import ReplayChatCompletionClient

            return ReplayChatCompletionClient(script.get(agent, []), model_info=OFFLINE_MODEL_INFO)
        from autogen_ext.models.openai import OpenAIChatCompletionClient

        kwargs: dict[str, Any] = {
            "model": chosen.model or DEFAULT_OPENAI_MODEL,
            "api_key": chosen.api_key or "not-needed",
            "timeout": chosen.timeout,
            "max_retries": 0,  # a failure becomes a visible error event; the run can be retried
        }
        if chosen.base_url:
            kwargs["base_url"] = chosen.base_url
            kwargs["model_info"] = GENERIC_MODEL_INFO
        return OpenAIChatCompletionClient(**kwargs)

    return build


def _validate(config: ModelConfig, *, where: str) -> None:
    if config.provider not in PROVIDERS:
        raise ModelConfigError(f"Unknown model provider {config.provider!r} in {where}.")
    if config.provider == "openai" and not config.base_url and not config.api_key:
        raise ModelConfigError(
            f"{where.capitalize()} use OpenAI without an API key: set OPENAI_API_KEY, or OPENAI_BASE_URL for a local "
            "OpenAI-compatible server (Ollama, vLLM, llama.cpp, LM Studio)."
        )
    if config.provider == "replay" and not config.replay_script:
        raise ModelConfigError(f"{where.capitalize()} use the replay provider without a script (CMBAGENT_REPLAY_SCRIPT).")


async def check_reachable(config: ModelConfig) -> None:
    """Raise ModelConfigError if an OpenAI-compatible endpoint in ``config`` cannot be reached."""
    endpoints = {
        (c.base_url or "https://api.openai.com/v1", c.api_key)
        for c in [config, *(config.for_agent(a) for a in config.agents)]
        if c.provider == "openai"
    }
    for base_url, api_key in endpoints:
        await asyncio.to_thread(_probe, base_url, api_key, min(config.timeout, 10.0))


def _probe(base_url: str, api_key: str, timeout: float) -> None:
    request = urllib.request.Request(base_url.rstrip("/") + "/models", headers={"Authorization": f"Bearer {api_key or 'not-needed'}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout):  # noqa: S310 - the configured endpoint
            return
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise ModelConfigError(f"The model endpoint {base_url} refused the API key (HTTP {exc.code}).") from exc
        return  # it answered: reachable, even if it has no /models route
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ModelConfigError(f"The model endpoint {base_url} cannot be reached: {reason}.") from exc

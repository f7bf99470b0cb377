"""How a real environment calls an OpenAI-compatible endpoint (Ollama, vLLM, LM Studio, Azure).

Not run in tests: it needs a server. Simulated people and the relation scorer are LLM calls; the
robot's strategy (the policy's choice) is rendered into one Japanese sentence by another call.
What it shows:
- settings from the config's own sections (`llm:` for the endpoint, `env:` for the episode), as
  the origin project wrote them;
- per-request timeouts and retries inside the environment (a hung HTTP call is cut by its own
  timeout, so swallowctl's `environment.timeout_s` is only the last resort), and a response cache
  (identical requests at temperature 0 with a seed are answered once);
- a `step` that changes nothing until every call of it succeeded, so a retry is safe;
- `state_dict` / `load_state_dict`, so a resumed run continues each conversation.

    environment:
      entrypoint: examples.openai_env:LLMConversationEnv
      concurrency: 16            # steps in flight: each is ~2 + 2 x evaluation_horizon requests
      timeout_s: 600
      retries: 0                 # requests retry themselves (llm.max_retries)
    llm:
      base_url: http://localhost:11434/v1     # Ollama; vLLM: http://HOST:8000/v1
      model: qwen2.5:7b-instruct
      api_key_env: OPENAI_API_KEY             # the variable holding the key (none for Ollama)
      request_timeout_s: 60
      max_retries: 3
    env:
      max_steps: 4
      evaluation_horizon: 2      # turns the people speak after the robot before re-scoring
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import threading
import time
import urllib.error
import urllib.request
from typing import Any

from swallowctl.ppo.environment import EDGES, Observation, StepResult, intervention_fields

PERSONAS = {
    "A": "慎重で、自分の意見を否定されると傷つきやすい大学生",
    "B": "行動派で、はっきり物を言う大学生",
    "C": "調整役になりがちだが、本当は自分の希望もある大学生",
}
STRATEGIES = {
    "validate": "対象の人の気持ちや意見を認める",
    "bridge": "二人の共通点や同じ目標をつなぐ",
    "plan": "次に何をするかを具体的に提案する",
}
TOPICS = ("週末の旅行先", "文化祭の出し物", "サークルの合宿の場所", "卒業旅行の予算")


class ChatClient:
    """A minimal OpenAI-compatible `/chat/completions` client: timeout, retries, cache."""

    def __init__(self, llm: dict[str, Any]) -> None:
        self.url = str(llm.get("base_url", "http://localhost:11434/v1")).rstrip("/")
        self.model = str(llm.get("model", "qwen2.5:7b-instruct"))
        key_env = llm.get("api_key_env", "OPENAI_API_KEY")
        self.api_key = os.environ.get(key_env, "") if key_env else ""
        self.timeout_s = float(llm.get("request_timeout_s", 60))
        self.max_retries = int(llm.get("max_retries", 3))
        self._cache: dict[str, str] = {}
        self._lock = threading.Lock()
        self.calls = 0

    def chat(self, messages: list[dict[str, str]], *, temperature: float, seed: int) -> str:
        payload = {
            "model": self.model,
            "messages": messages,
            "temperature": temperature,
            "seed": seed,
            "max_tokens": 200,
        }
        key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
        with self._lock:
            if temperature == 0 and key in self._cache:
                return self._cache[key]
        text = self._post(payload)
        with self._lock:
            self.calls += 1
            if temperature == 0:
                self._cache[key] = text
        return text

    def _post(self, payload: dict[str, Any]) -> str:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(payload, ensure_ascii=False).encode()
        for attempt in range(self.max_retries + 1):
            request = urllib.request.Request(
                f"{self.url}/chat/completions", data=data, headers=headers
            )
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    body = json.loads(response.read())
                return str(body["choices"][0]["message"]["content"]).strip()
            except urllib.error.HTTPError as e:
                # 429 and 5xx are worth another try; 4xx is a bug in the request.
                if (e.code != 429 and e.code < 500) or attempt == self.max_retries:
                    raise
            except (urllib.error.URLError, TimeoutError):
                if attempt == self.max_retries:
                    raise
            time.sleep(min(2.0**attempt, 30.0))
        raise AssertionError("unreachable")


class LLMConversationEnv:
    """Three LLM personas talk; an LLM scorer rates the pairs; the robot's strategy is spoken."""

    def __init__(self, settings: dict[str, Any], sections: dict[str, Any]) -> None:
        env = {**(sections.get("env") or {}), **settings}
        self.client = ChatClient(sections.get("llm") or {})
        self.max_steps = int(env.get("max_steps", 4))
        self.horizon = int(env.get("evaluation_horizon", 2))
        self.opening_turns = int(env.get("opening_turns", 6))
        self.stable_bonus = float(env.get("stable_bonus", 0.3))
        self._state: dict[str, Any] = {}

    # --- the interface ---------------------------------------------------------------------

    def reset(self, seed: int) -> None:
        rng = random.Random(seed)
        topic = rng.choice(TOPICS)
        history: list[str] = []
        for turn in range(self.opening_turns):
            history.append(self._speak("ABC"[turn % 3], topic, history, seed + turn))
        scores = self._score(history, seed)
        self._state = {
            "seed": seed,
            "step": 0,
            "topic": topic,
            "history": history,
            "scores": scores,
        }

    def observe(self) -> Observation:
        s = self._state
        edge = min(EDGES, key=lambda e: s["scores"][e])
        # The target: whoever on the weakest edge spoke last.
        target = next((line[0] for line in reversed(s["history"]) if line[0] in edge), edge[0])
        mine = [line[3:] for line in s["history"] if line[0] == target][-3:]
        fields = intervention_fields(
            topic=s["topic"],
            utterances=s["history"][-6:],
            target_utterances=mine,
            scores=s["scores"],
            edge=edge,
            target=target,
        )
        return Observation(
            fields=fields,
            state={"step": s["step"], "edge": edge, "target": target, "scores": s["scores"]},
        )

    def step(self, completion: str, choice: str | None, state: dict[str, Any]) -> StepResult:
        s = self._state
        if state["step"] != s["step"]:
            raise ValueError(f"stale state: step {state['step']}, environment at {s['step']}")
        seed = s["seed"] * 1000 + s["step"] * 10
        # Work on copies: nothing changes until every request of this step has succeeded.
        history = list(s["history"])
        if choice in STRATEGIES:
            history.append(f"R: {self._robot(choice, state['target'], s['topic'], history, seed)}")
        for turn in range(self.horizon):
            history.append(
                self._speak("ABC"[(len(history) + turn) % 3], s["topic"], history, seed + turn + 1)
            )
        scores = self._score(history, seed + 9)
        edge = state["edge"]
        delta = scores[edge] - state["scores"][edge]
        stable = all(v >= 0 for v in scores.values())
        s.update(history=history, scores=scores, step=s["step"] + 1)
        done = stable or s["step"] >= self.max_steps
        info = {"edge_delta": delta, "stable": float(stable), "llm_calls": self.client.calls}
        return StepResult(delta + self.stable_bonus * stable, done, info)

    def state_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(self._state))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._state = dict(state)

    # --- the LLM calls -----------------------------------------------------------------------

    def _speak(self, person: str, topic: str, history: list[str], seed: int) -> str:
        system = (
            f"あなたは{person}さん({PERSONAS[person]})です。話題「{topic}」について三人で話して"
            "います。次のあなたの発言を一文だけ、名前を付けずに書いてください。"
        )
        talk = "\n".join(history[-8:]) or "(まだ誰も話していません)"
        text = self.client.chat(
            [{"role": "system", "content": system}, {"role": "user", "content": talk}],
            temperature=0.7,
            seed=seed,
        )
        return f"{person}: {text.splitlines()[0] if text else '……'}"

    def _robot(self, strategy: str, target: str, topic: str, history: list[str], seed: int) -> str:
        system = (
            "あなたは三人の会話を見守るロボットです。次の方針で、"
            f"{target}さんに向けて一文だけ話してください: {STRATEGIES[strategy]}。"
        )
        talk = "\n".join(history[-8:])
        return self.client.chat(
            [{"role": "system", "content": system}, {"role": "user", "content": talk}],
            temperature=0,
            seed=seed,
        )

    def _score(self, history: list[str], seed: int) -> dict[str, float]:
        system = (
            "三人(A, B, C)の会話を読み、各ペアの関係を-1(険悪)から+1(良好)で評価してください。"
            '{"AB": 数値, "BC": 数値, "CA": 数値} のJSONだけを出力してください。'
        )
        text = self.client.chat(
            [
                {"role": "system", "content": system},
                {"role": "user", "content": "\n".join(history[-12:])},
            ],
            temperature=0,
            seed=seed,
        )
        found = re.search(r"\{.*\}", text, re.S)
        if not found:
            raise ValueError(f"the scorer did not answer JSON: {text[:80]!r}")
        raw = json.loads(found.group(0))
        return {e: max(-1.0, min(1.0, float(raw[e]))) for e in EDGES}

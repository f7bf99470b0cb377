"""An offline, deterministic three-person conversation for the `intervention` mode.

No network and no LLM: people A, B and C speak scripted lines about a topic, and the relation
scores of the pairs (w_AB, w_BC, w_CA, from -1 to +1) change by simple rules. At each decision
point the weakest edge is the one to improve and one of its two people is the target. The target
has a hidden need (validate, bridge, plan or no_intervention); the last thing they say is a cue
that gives it away, e.g. 「ちゃんと聞いてほしいだけなのに。」 -> validate. The robot's strategy is
rewarded for matching the need and for what it does to the target edge:

    reward = match_bonus (1.0) if the strategy matches the need
           + edge_weight (1.0) x the change of the target edge
           + stable_bonus (0.2) when every edge is >= 0 afterwards

An episode is `max_steps` decisions (3), or ends early once every edge is >= 0. `info` reports
`correct` (the right strategy: choice/accuracy), `matched`, `edge_delta` and `stable`.

Use it with `environment.entrypoint: examples.intervention_env:InterventionEnv` (run from the
repository root) and check it with `swallowctl env check -c examples/intervention.yaml`.
Real environments replace the scripted lines and rules with LLM calls: see openai_env.py.
"""

from __future__ import annotations

import random
from typing import Any

from swallowctl.ppo.environment import EDGES, Observation, StepResult, intervention_fields

NEEDS = ("validate", "bridge", "plan", "no_intervention")

# A few distinct cue lines per need, said last by the target. {other} is the other person on
# the edge. Short and lexically distinct on purpose: even the tiny test model can learn them.
CUES: dict[str, tuple[str, ...]] = {
    "validate": (
        "ちゃんと聞いてほしいだけなのに。",
        "誰も私の気持ちをわかってくれない。",
        "私の意見なんてどうでもいいんでしょ。",
    ),
    "bridge": (
        "{other}さんも本当は同じことを考えてるよね。",
        "結局{other}さんと私、目指してるものは一緒だと思う。",
        "{other}さんの案と私の案、合わせられないかな。",
    ),
    "plan": (
        "で、結局どうすればいいの？",
        "まず何から決めればいいんだろう。",
        "いつまでに何をするか決めようよ。",
    ),
    "no_intervention": (
        "まあ、二人で話せば大丈夫だよ。",
        "さっきのはもう気にしてないよ。",
        "今いい感じに話せてると思う。",
    ),
}

# Scripted small talk per topic: what people say before the target's cue.
TOPICS: dict[str, tuple[str, ...]] = {
    "週末の旅行先": (
        "今度の週末、温泉に行こうよ。",
        "えー、また温泉？遊園地のほうが楽しいと思うけど。",
        "あんまりお金はかけたくないな。",
        "遊園地って混んでるし、疲れるだけじゃない？",
    ),
    "文化祭の出し物": (
        "今年はお化け屋敷がいいと思う。",
        "準備が大変そうだし、カフェのほうが楽じゃない？",
        "去年もカフェだったよね。",
        "衣装を作るのは誰がやるの？",
    ),
    "夕飯の献立": (
        "今日はカレーにしようか。",
        "昨日もカレーだったよ。",
        "たまには魚が食べたいな。",
        "買い物に行く時間がないんだけど。",
    ),
    "サークルの合宿": (
        "合宿は山の方がいいな。",
        "海のほうが人が集まると思う。",
        "日程がまだ決まってないよね。",
        "予算の話を先にしない？",
    ),
}

PEOPLE = ("A", "B", "C")


class InterventionEnv:
    """Three scripted people, hidden needs revealed by cues, rule-based relation scores.

    Settings (all optional): `max_steps` (3; else the config's `env.max_steps`), `match_bonus`
    (1.0), `edge_weight` (1.0), `stable_bonus` (0.2), `invalid_reward` (-1.0: a step without a
    choice, e.g. in a free-text mode), `history` (3: lines of small talk before the cue).
    """

    def __init__(self, settings: dict[str, Any], sections: dict[str, Any]) -> None:
        env_section = sections.get("env") or {}
        self.max_steps = int(settings.get("max_steps", env_section.get("max_steps", 3)))
        self.match_bonus = float(settings.get("match_bonus", 1.0))
        self.edge_weight = float(settings.get("edge_weight", 1.0))
        self.stable_bonus = float(settings.get("stable_bonus", 0.2))
        self.invalid_reward = float(settings.get("invalid_reward", -1.0))
        self.history = int(settings.get("history", 3))
        if self.max_steps <= 0 or self.history < 0:
            raise ValueError("max_steps must be positive and history not negative")
        self._rng = random.Random(0)
        self._seed = -1
        self._step = 0
        self._topic = ""
        self._scores: dict[str, float] = {}
        self._decision: dict[str, Any] = {}

    # --- the interface ---------------------------------------------------------------------

    def reset(self, seed: int) -> None:
        self._rng = random.Random(seed)
        self._seed = seed
        self._step = 0
        self._topic = self._rng.choice(sorted(TOPICS))
        scores = {e: round(self._rng.uniform(-0.8, 0.6), 2) for e in EDGES}
        weakest = min(scores, key=scores.__getitem__)
        scores[weakest] = min(scores[weakest], -0.3)  # there is always something to repair
        self._scores = scores
        self._decision = self._decide()

    def observe(self) -> Observation:
        d = self._decision
        fields = intervention_fields(
            topic=self._topic,
            utterances=d["utterances"],
            target_utterances=d["target_utterances"],
            scores=self._scores,
            edge=d["edge"],
            target=d["target"],
        )
        state = {
            "seed": self._seed,
            "step": self._step,
            "need": d["need"],
            "edge": d["edge"],
            "target": d["target"],
            "scores": dict(self._scores),
        }
        return Observation(fields=fields, state=state)

    def step(self, completion: str, choice: str | None, state: dict[str, Any]) -> StepResult:
        # The sample's state must be this environment's current state: a stale or foreign state
        # is exactly the bug of the origin project (scoring against a later state).
        if (state.get("seed"), state.get("step")) != (self._seed, self._step):
            raise ValueError(
                f"stale state: episode {state.get('seed')} step {state.get('step')}, but the "
                f"environment is at episode {self._seed} step {self._step}"
            )
        need, edge = state["need"], state["edge"]
        if choice is None:
            info = {"correct": need, "matched": 0.0, "edge_delta": 0.0, "stable": 0.0}
            return StepResult(self.invalid_reward, False, info)
        before = self._scores[edge]
        self._apply(choice, need, edge)
        delta = self._scores[edge] - before
        stable = all(v >= 0 for v in self._scores.values())
        matched = choice == need
        reward = self.match_bonus * matched + self.edge_weight * delta + self.stable_bonus * stable
        self._step += 1
        done = stable or self._step >= self.max_steps
        if not done:
            self._decision = self._decide()
        info = {
            "correct": need,
            "matched": float(matched),
            "edge_delta": round(delta, 4),
            "stable": float(stable),
        }
        return StepResult(round(reward, 4), done, info)

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = self._rng.getstate()
        return {
            "rng": [version, list(internal), gauss],
            "seed": self._seed,
            "step": self._step,
            "topic": self._topic,
            "scores": self._scores,
            "decision": self._decision,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        version, internal, gauss = state["rng"]
        self._rng.setstate((version, tuple(internal), gauss))
        self._seed, self._step = state["seed"], state["step"]
        self._topic, self._scores = state["topic"], dict(state["scores"])
        self._decision = dict(state["decision"])

    # --- the rules ---------------------------------------------------------------------------

    def _decide(self) -> dict[str, Any]:
        """The next decision point: weakest edge, its target, a hidden need and what is said."""
        edge = min(EDGES, key=lambda e: (self._scores[e], e))
        target = self._rng.choice(edge)
        other = edge.replace(target, "")
        need = self._rng.choice(NEEDS)
        cue = self._rng.choice(CUES[need]).format(other=other)
        lines = TOPICS[self._topic]
        start = self._rng.randrange(len(lines))
        talk = [lines[(start + i) % len(lines)] for i in range(self.history)]
        others = [p for p in PEOPLE if p != target]
        order = (others[0], target, others[1])
        utterances = [f"{order[i % 3]}: {line}" for i, line in enumerate(talk)]
        utterances.append(f"{target}: {cue}")
        said = [line for i, line in enumerate(talk) if order[i % 3] == target]
        return {
            "edge": edge,
            "target": target,
            "need": need,
            "utterances": utterances,
            "target_utterances": [*said[-1:], cue],
        }

    def _apply(self, choice: str, need: str, edge: str) -> None:
        """Relation rules: the right strategy repairs the edge; a wrong one hurts it a little."""
        if choice == need:
            change = 0.4 if need != "no_intervention" else 0.2
        elif need == "no_intervention":
            change = -0.15  # stepping in when they were settling it themselves
        elif choice == "no_intervention":
            change = -0.1  # a need left alone
        else:
            change = -0.2  # the wrong kind of help
        self._scores[edge] = _clip(self._scores[edge] + change)
        for e in EDGES:  # the rest of the triangle drifts a little
            if e != edge:
                self._scores[e] = _clip(self._scores[e] + self._rng.uniform(-0.05, 0.05))


def _clip(x: float) -> float:
    return round(max(-1.0, min(1.0, x)), 2)

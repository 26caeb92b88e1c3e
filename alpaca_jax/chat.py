"""`alpaca-jax chat`: talk to a model in the terminal, tokens printed as they are decoded.

Each turn becomes prompt ids through the prompt owner (`data/prompt.py`: the run's chat
template, as training rendered it). A model trained on conversations (vicuna_v1.1, koala,
tokenizer) sees the earlier turns while they fit the context (the oldest are dropped first); an
Alpaca model was trained on single instructions, so each message is answered on its own.
`/reset` starts over, `/exit` or end of input quits, and Ctrl-C stops the answer being
written, not the session.
"""

from __future__ import annotations

import dataclasses
import signal
import sys
import threading
from typing import TextIO

from alpaca_jax.data.prompt import PromptTooLongError
from alpaca_jax.infer import LoadedModel, Row, SamplingConfig, decode_rows

HELP = "/reset clears the conversation, /exit (or Ctrl-D) quits, Ctrl-C stops an answer."


def _fitting_prompt(model: LoadedModel, history: list[dict], question: str, system: str | None):
    """Prompt ids for the question after as much recent history as fits (None if it never fits)."""
    turns = list(history) if model.multi_turn else []
    while True:
        messages = [{"role": "system", "content": system}] if system is not None else []
        messages += [*turns, {"role": "user", "content": question}]
        try:
            return model.encode_messages(messages)
        except PromptTooLongError:
            if not turns:
                return None
            turns = turns[2:]  # drop the oldest question and its answer


def chat(model: LoadedModel, sampling: SamplingConfig = SamplingConfig(temperature=0.7, top_p=0.9),
         system: str | None = None, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> None:
    """The read-answer loop; returns at /exit or end of input."""
    if threading.current_thread() is threading.main_thread():
        # Ctrl-C must reach us as KeyboardInterrupt even when started with SIGINT ignored (a
        # background job of a non-interactive shell inherits SIG_IGN, and Python keeps it).
        signal.signal(signal.SIGINT, signal.default_int_handler)
    print(f"Chatting with {model.name}. {HELP}", file=stdout, flush=True)
    if not model.multi_turn:
        print(f"(trained on single {model.template} prompts: each message is answered on its own)",
              file=stdout, flush=True)
    history: list[dict] = []
    turn = 0
    while True:
        print(">>> ", end="", file=stdout, flush=True)
        try:
            line = stdin.readline()
        except KeyboardInterrupt:
            print(file=stdout, flush=True)
            continue
        if not line:  # end of input
            print(file=stdout, flush=True)
            return
        question = line.strip()
        if not question:
            continue
        if question in ("/exit", "/quit"):
            return
        if question == "/reset":
            history, turn = [], 0
            print("(conversation cleared)", file=stdout, flush=True)
            continue
        ids = _fitting_prompt(model, history, question, system)
        if ids is None:
            print(f"(that message alone is longer than the model's {model.max_len}-token context)",
                  file=stdout, flush=True)
            continue
        pieces: list[str] = []

        def show(piece: str) -> None:
            pieces.append(piece)
            stdout.write(piece)
            stdout.flush()
        try:
            # A new seed each turn: asking again gives a new sample, reproducibly.
            decode_rows(model, [Row(ids, dataclasses.replace(sampling, seed=sampling.seed + turn), show)])
            print(file=stdout, flush=True)
        except KeyboardInterrupt:
            print("\n(stopped)", file=stdout, flush=True)
        history += [{"role": "user", "content": question}, {"role": "assistant", "content": "".join(pieces)}]
        turn += 1

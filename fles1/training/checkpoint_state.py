"""Callback state that travels with Trainer checkpoints: ``<output_dir>/checkpoint-<step>/<STATE_FILE>``."""

from __future__ import annotations

import json
import os

from fles1.atomic import atomic_write_json


class CheckpointStateMixin:
    """For a TrainerCallback with ``state_dict()`` / ``load_state_dict()``: saved in every checkpoint folder (and
    a copy inside its trainer_state.json), read back from the one training resumes from (`restore`)."""

    STATE_FILE: str = "callback_state.json"
    # key -> test of its value: what `load_state_dict` reads. A file lacking one or failing it (hand-edited, another
    # tool's) is damaged: resume skips or refuses its checkpoint (trainer.resolve_resume), not a KeyError mid-train
    STATE_FIELDS: dict = {}
    resume_from: str | None = None

    @classmethod
    def readable_state(cls, state) -> bool:
        return isinstance(state, dict) and all(key in state and test(state[key])
                                               for key, test in cls.STATE_FIELDS.items())

    def checkpoint_folder(self, args, state) -> str:
        return self.resume_from or os.path.join(args.output_dir, f"checkpoint-{state.global_step}")

    @property
    def state_key(self) -> str:
        """The copy's key in ``TrainerState.stateful_callbacks`` (no callback class is named so: transformers'
        ``restore_callback_states_from_checkpoint`` leaves it alone, with a warning)."""
        return f"fles1/{self.STATE_FILE}"

    def restore(self, args, state) -> bool:
        """Load the state of the checkpoint a resumed run starts from: ``resume_from``'s file (FLES1Trainer sets
        it), else the copy in the trainer_state.json just resumed from -- sentence-transformers' trainer does not
        tell callbacks which folder ``train(resume_from_checkpoint=...)`` named -- else the standard layout's file.
        False when there is none."""
        if self.resume_from:
            return self.load(self.resume_from)
        saved = (state.stateful_callbacks or {}).get(self.state_key)
        if isinstance(saved, dict) and saved.get("global_step") == state.global_step:  # written with that checkpoint
            self._load_checked(saved.get("state"), f"trainer_state.json's {self.state_key}")
            return True
        return self.load(self.checkpoint_folder(args, state))  # the standard layout: resume_from is unset here

    def load(self, checkpoint_dir: str) -> bool:
        path = os.path.join(checkpoint_dir, self.STATE_FILE)
        if not os.path.isfile(path):
            return False
        with open(path, encoding="utf-8") as handle:
            state = json.load(handle)
        self._load_checked(state, path)
        return True

    def _load_checked(self, state, source: str) -> None:
        if not self.readable_state(state):
            needs = f" (it needs {', '.join(self.STATE_FIELDS)})" if self.STATE_FIELDS else ""
            raise ValueError(f"{source}: not a {type(self).__name__} state{needs}")
        self.load_state_dict(state)

    def write_state(self, args, state) -> None:
        # the copy: transformers writes trainer_state.json after on_step_end (after on_save: then the copy's step
        # is older than the checkpoint's, and `restore` reads the file instead)
        state.stateful_callbacks[self.state_key] = {"global_step": state.global_step, "state": self.state_dict()}
        if args.should_save:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            os.makedirs(folder, exist_ok=True)
            # atomic: with trainer_state.json, its presence marks the checkpoint complete (trainer.resolve_resume)
            atomic_write_json(os.path.join(folder, self.STATE_FILE), self.state_dict(), indent=1)

    def save_ahead(self, args, state, control) -> None:
        """Write the state into the checkpoint the trainer is about to save. transformers writes
        trainer_state.json and then deletes older checkpoints (save_total_limit) before any ``on_save``: a kill in
        between left the newest checkpoint without this file and the last complete one deleted."""
        if control.should_save:
            self.write_state(args, state)

    def on_step_end(self, args, state, control, **kwargs):
        self.save_ahead(args, state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        self.save_ahead(args, state, control)

    def on_save(self, args, state, control, **kwargs):  # saves the trainer was not told of in advance (best model)
        self.write_state(args, state)

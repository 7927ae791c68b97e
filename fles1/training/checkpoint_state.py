"""Callback state that travels with Trainer checkpoints: ``<output_dir>/checkpoint-<step>/<STATE_FILE>``."""

from __future__ import annotations

import json
import os

from fles1.atomic import atomic_open


class CheckpointStateMixin:
    """For a TrainerCallback with ``state_dict()`` / ``load_state_dict()``: saved in every checkpoint folder,
    read back from the one training resumes from (``resume_from``, else the standard layout)."""

    STATE_FILE: str = "callback_state.json"
    resume_from: str | None = None

    def checkpoint_folder(self, args, state) -> str:
        return self.resume_from or os.path.join(args.output_dir, f"checkpoint-{state.global_step}")

    def load(self, checkpoint_dir: str) -> bool:
        path = os.path.join(checkpoint_dir, self.STATE_FILE)
        if not os.path.isfile(path):
            return False
        with open(path, encoding="utf-8") as handle:
            self.load_state_dict(json.load(handle))
        return True

    def write_state(self, args, state) -> None:
        if args.should_save:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            os.makedirs(folder, exist_ok=True)
            # atomic: with trainer_state.json, its presence marks the checkpoint complete (trainer.resolve_resume)
            with atomic_open(os.path.join(folder, self.STATE_FILE)) as handle:
                json.dump(self.state_dict(), handle, indent=1)

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

"""Which worker failures Ray Train retries: the loss of a worker, never an error in the user's input.

Ray Train's default failure policy restarts the worker group for any worker error, up to
`FailureConfig(max_failures)` times. A `UserError` raised in a worker (a config the data cannot satisfy,
a checkpoint of another config, missing files) fails the same way on every try, so retrying it only
spends minutes and ends in a `WorkerGroupError` traceback. Here such an error ends the run at once, and
the driver raises the worker's own `UserError`: the same one paragraph as any other bad input.

Ray 2.60 takes a custom policy only through the controller's arguments, which the public trainer builds
itself (`create_failure_policy` returns the default): `ByolTrainer` hands its own to the controller.
"""

from __future__ import annotations

import logging
import sys

from ray.train.torch import TorchTrainer
from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy, FailureDecision
from ray.train.v2.api.exceptions import WorkerGroupError

from ..errors import UserError


def user_error_in(error: BaseException) -> UserError | None:
    """The `UserError` a worker raised, if `error` (what `TrainingFailedError` fit raises) carries one."""
    if not isinstance(error, WorkerGroupError):
        return None
    for failure in error.worker_failures.values():
        # Ray wraps the worker's exception with its traceback text (UserExceptionWithTraceback); the
        # exception itself travels as its first argument.
        for cause in (failure, *getattr(failure, "args", ())):
            if isinstance(cause, UserError):
                return cause
    return None


class UserErrorsAreFinal(DefaultFailurePolicy):
    """Ray's default policy, except that a worker group failing with a `UserError` is not restarted."""

    def make_decision(self, training_failed_error):
        if user_error_in(training_failed_error) is not None:
            return FailureDecision.RAISE
        return super().make_decision(training_failed_error)


class ByolTrainer(TorchTrainer):
    """A `TorchTrainer` whose controller uses `UserErrorsAreFinal`."""

    # ray.train.torch and ray.train export Train v2's TorchTrainer and RunConfig at run time (v2 is on by
    # default) but mypy sees their v1 definitions, which have no controller and v1's Optional FailureConfig
    # (v2's RunConfig.__post_init__ always sets one): hence the two ignores.
    def _initialize_and_run_controller(self, **controller_init_kwargs):
        failure_config = self.run_config.failure_config
        controller_init_kwargs["failure_policy"] = UserErrorsAreFinal(failure_config)  # type: ignore[arg-type]
        return super()._initialize_and_run_controller(**controller_init_kwargs)  # type: ignore[misc]


class _DropUserErrorTraceback(logging.Filter):
    """Ray Train logs every exception of the training function with its traceback, in the worker; for a
    UserError the driver prints the paragraph, which is all there is to say."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not isinstance(sys.exc_info()[1], UserError)


def quiet_user_errors() -> None:
    """In a worker: no traceback in the logs for a UserError (Ray logs it while handling it)."""
    logger = logging.getLogger("ray.train.v2._internal.util")
    if not any(isinstance(f, _DropUserErrorTraceback) for f in logger.filters):
        logger.addFilter(_DropUserErrorTraceback())

"""Every error lorafid raises on purpose.

Each class is one kind of failure a user can act on. Messages are full sentences that say
what failed, on which repo/file/tensor, and what to do next; the CLI prints them as one
line and the app shows them as they are. Causes are chained with ``raise ... from e``.
"""

from __future__ import annotations


class LorafidError(Exception):
    """Base class: a failure with a message meant for the user, not a traceback.

    Some classes also carry structured fields (which repo, what kind of failure) so a page can
    say what to do in its own words (its fields and buttons, not the CLI's flags) without
    reading the message. The fields survive pickling (a Ray worker's error reaches the driver).
    """

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), self.args, self.__dict__)


class RepoNotFoundError(LorafidError):
    """The Hub repo does not exist, or is private and the token cannot see it.

    Fields: ``repo`` and ``endpoint`` (the Hub asked); ``token_rejected``: the Hub refused the
    token itself (401), rather than not finding the repo.
    """

    def __init__(self, message: str = "", *, repo: str = "", endpoint: str = "", token_rejected: bool = False):
        super().__init__(message)
        self.repo, self.endpoint, self.token_rejected = repo, endpoint, token_rejected


class GatedRepoError(LorafidError):
    """The repo is gated: the user must accept its licence on the Hub and pass a token.

    Fields: ``repo``; ``page``: where its licence is accepted.
    """

    def __init__(self, message: str = "", *, repo: str = "", page: str = ""):
        super().__init__(message)
        self.repo, self.page = repo, page


class RevisionNotFoundError(LorafidError):
    """The branch, tag or commit asked for does not exist in the repo."""


class NotSafetensorsError(LorafidError):
    """The source has no ``.safetensors`` weights (pickle-only repos are refused, never loaded)."""


class SafetensorsHeaderError(LorafidError):
    """A safetensors header is malformed: bad length, bad JSON, bad offsets, bad sizes."""


class UnsupportedDtypeError(LorafidError):
    """A tensor's dtype cannot be compared exactly (quantized packs, FP8 with scales...)."""


class NoCommonTensorsError(LorafidError):
    """The two models share no comparable weight matrix: probably not base and fine-tune."""


class EmptySelectionError(LorafidError):
    """The include/exclude patterns leave no weight matrix to audit (the models do share some)."""


class NonFiniteWeightsError(LorafidError):
    """A weight or its delta holds NaN or Inf: no spectrum is meaningful for that matrix."""


class SpectrumNotLoadedError(LorafidError):
    """A rank off the stored grid was asked for and the full spectra are not at hand."""


class FetchError(LorafidError):
    """Bytes could not be read correctly after retries (network fault, wrong range, short body)."""


class LimitExceededError(LorafidError):
    """A configured limit (model size, tensor size, queue) would be exceeded."""


class InvalidSourceError(LorafidError):
    """A source string is neither a valid Hub repo ID nor an allowed local path.

    Field: ``problem``, what is wrong with it, without the message's advice on the forms a
    source may take (a page that reads Hub repos only gives its own).
    """

    def __init__(self, message: str = "", *, problem: str = ""):
        super().__init__(message)
        self.problem = problem


class UnsafeEndpointError(LorafidError):
    """A server-side outbound URL is refused: not https, or its host is not a public address."""


class ProviderError(LorafidError):
    """An OpenAI-compatible endpoint failed after retries, refused the key, or answered nonsense."""


class ChannelUnsupportedError(ProviderError):
    """The endpoint does not offer one way of reading log-probabilities (e.g. rejects ``echo``)."""


class TokenMismatchError(LorafidError):
    """The provider's tokens are not the fine-tune tokenizer's tokens: the texts cannot be compared."""


class CatalogueError(LorafidError):
    """A batch catalogue (CSV or YAML list of pairs) is malformed: the message names the row and field."""


class RayClusterError(LorafidError):
    """The Ray cluster of a batch cannot be joined: nobody answers, or it refuses our token (or our lack of one)."""


class MissingExtraError(LorafidError):
    """An optional dependency is not installed; the message names the ``pip install lorafid[...]`` extra."""


class AmbiguousPairingError(LorafidError):
    """The two models' tensor names match under more than one wrapper prefix: no pairing is guessed."""


class RegistryError(LorafidError):
    """The results registry (a Hub dataset) could not be read or written, or lacks a result."""


class ResultSchemaError(LorafidError):
    """A published or stored result has a schema this lorafid does not read: refused, never misread."""


class VerificationError(LorafidError):
    """A re-run audit does not reproduce a published result within the precision bar."""


class UnsupportedAdapterError(LorafidError):
    """An adapter lorafid cannot read as a plain PEFT LoRA: DoRA, another PEFT type, or missing files."""


class AdapterMismatchError(LorafidError):
    """An adapter does not fit the models: it names matrices they lack, or its factors have other shapes."""


class UnsupportedArchitectureError(LorafidError):
    """The model's architecture is not one the layer-streamed forward can run (Llama family only)."""


class MissingModelFileError(LorafidError):
    """A file beside the weights that a forward pass needs (config.json, tokenizer.json) is absent."""


class VocabularyMismatchError(LorafidError):
    """Base and fine-tune have different vocabularies, so their next-token distributions cannot be compared."""


class ReportFormatError(LorafidError):
    """A stored, downloaded or published document is not the lorafid document it claims to be."""


class ChatTemplateError(LorafidError):
    """A repo's chat template is too long, runs too long or too large, or fails: it is not rendered."""


class TokenizerError(LorafidError):
    """A repo's tokenizer is too large to load on this server, or fails inside its own code (a Rust panic)."""

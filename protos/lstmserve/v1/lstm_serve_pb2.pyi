from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StepOutput(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STEP_OUTPUT_UNSPECIFIED: _ClassVar[StepOutput]
    STEP_OUTPUT_LAST_LOGITS: _ClassVar[StepOutput]
    STEP_OUTPUT_ALL_LOGITS: _ClassVar[StepOutput]
    STEP_OUTPUT_TOP_K: _ClassVar[StepOutput]

class ModelKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_KIND_UNSPECIFIED: _ClassVar[ModelKind]
    MODEL_KIND_TOKEN_LM: _ClassVar[ModelKind]
    MODEL_KIND_SEQUENCE: _ClassVar[ModelKind]

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
STEP_OUTPUT_UNSPECIFIED: StepOutput
STEP_OUTPUT_LAST_LOGITS: StepOutput
STEP_OUTPUT_ALL_LOGITS: StepOutput
STEP_OUTPUT_TOP_K: StepOutput
MODEL_KIND_UNSPECIFIED: ModelKind
MODEL_KIND_TOKEN_LM: ModelKind
MODEL_KIND_SEQUENCE: ModelKind
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_STOP: FinishReason

class FloatTensor(_message.Message):
    __slots__ = ("shape", "values")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., values: _Optional[_Iterable[float]] = ...) -> None: ...

class Scaling(_message.Message):
    __slots__ = ("feature_mean", "feature_std", "output_mean", "output_std")
    FEATURE_MEAN_FIELD_NUMBER: _ClassVar[int]
    FEATURE_STD_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_MEAN_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_STD_FIELD_NUMBER: _ClassVar[int]
    feature_mean: _containers.RepeatedScalarFieldContainer[float]
    feature_std: _containers.RepeatedScalarFieldContainer[float]
    output_mean: _containers.RepeatedScalarFieldContainer[float]
    output_std: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, feature_mean: _Optional[_Iterable[float]] = ..., feature_std: _Optional[_Iterable[float]] = ..., output_mean: _Optional[_Iterable[float]] = ..., output_std: _Optional[_Iterable[float]] = ...) -> None: ...

class CreateSessionRequest(_message.Message):
    __slots__ = ("idle_timeout_s", "session_id", "model_name", "model_version")
    IDLE_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    idle_timeout_s: float
    session_id: str
    model_name: str
    model_version: str
    def __init__(self, idle_timeout_s: _Optional[float] = ..., session_id: _Optional[str] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class CreateSessionResponse(_message.Message):
    __slots__ = ("session_id", "idle_timeout_s", "state_bytes", "model_name", "model_version")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    IDLE_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    STATE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    idle_timeout_s: float
    state_bytes: int
    model_name: str
    model_version: str
    def __init__(self, session_id: _Optional[str] = ..., idle_timeout_s: _Optional[float] = ..., state_bytes: _Optional[int] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CloseSessionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ResetSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class ResetSessionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class GetSessionResponse(_message.Message):
    __slots__ = ("session_id", "steps", "created_unix_s", "last_used_unix_s", "idle_timeout_s", "state_bytes", "busy", "has_next_distribution", "model_name", "model_version")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    IDLE_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    STATE_BYTES_FIELD_NUMBER: _ClassVar[int]
    BUSY_FIELD_NUMBER: _ClassVar[int]
    HAS_NEXT_DISTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    steps: int
    created_unix_s: float
    last_used_unix_s: float
    idle_timeout_s: float
    state_bytes: int
    busy: bool
    has_next_distribution: bool
    model_name: str
    model_version: str
    def __init__(self, session_id: _Optional[str] = ..., steps: _Optional[int] = ..., created_unix_s: _Optional[float] = ..., last_used_unix_s: _Optional[float] = ..., idle_timeout_s: _Optional[float] = ..., state_bytes: _Optional[int] = ..., busy: _Optional[bool] = ..., has_next_distribution: _Optional[bool] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class ListSessionsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class SessionSummary(_message.Message):
    __slots__ = ("session_id", "steps", "created_unix_s", "last_used_unix_s", "idle_timeout_s", "state_bytes", "busy", "has_next_distribution", "model_name", "model_version")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    IDLE_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    STATE_BYTES_FIELD_NUMBER: _ClassVar[int]
    BUSY_FIELD_NUMBER: _ClassVar[int]
    HAS_NEXT_DISTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    steps: int
    created_unix_s: float
    last_used_unix_s: float
    idle_timeout_s: float
    state_bytes: int
    busy: bool
    has_next_distribution: bool
    model_name: str
    model_version: str
    def __init__(self, session_id: _Optional[str] = ..., steps: _Optional[int] = ..., created_unix_s: _Optional[float] = ..., last_used_unix_s: _Optional[float] = ..., idle_timeout_s: _Optional[float] = ..., state_bytes: _Optional[int] = ..., busy: _Optional[bool] = ..., has_next_distribution: _Optional[bool] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class ListSessionsResponse(_message.Message):
    __slots__ = ("sessions", "next_page_token")
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    sessions: _containers.RepeatedCompositeFieldContainer[SessionSummary]
    next_page_token: str
    def __init__(self, sessions: _Optional[_Iterable[_Union[SessionSummary, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class TokenProbability(_message.Message):
    __slots__ = ("token_id", "token", "probability")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    token: str
    probability: float
    def __init__(self, token_id: _Optional[int] = ..., token: _Optional[str] = ..., probability: _Optional[float] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("session_id", "text", "token_ids", "output", "top_k", "request_id", "model_name", "model_version", "features")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    output: StepOutput
    top_k: int
    request_id: str
    model_name: str
    model_version: str
    features: FloatTensor
    def __init__(self, session_id: _Optional[str] = ..., text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., output: _Optional[_Union[StepOutput, str]] = ..., top_k: _Optional[int] = ..., request_id: _Optional[str] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., features: _Optional[_Union[FloatTensor, _Mapping]] = ...) -> None: ...

class StepResponse(_message.Message):
    __slots__ = ("session_id", "logits", "positions", "top", "tokens_consumed", "steps", "outputs")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    TOKENS_CONSUMED_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    logits: _containers.RepeatedScalarFieldContainer[float]
    positions: int
    top: _containers.RepeatedCompositeFieldContainer[TokenProbability]
    tokens_consumed: int
    steps: int
    outputs: FloatTensor
    def __init__(self, session_id: _Optional[str] = ..., logits: _Optional[_Iterable[float]] = ..., positions: _Optional[int] = ..., top: _Optional[_Iterable[_Union[TokenProbability, _Mapping]]] = ..., tokens_consumed: _Optional[int] = ..., steps: _Optional[int] = ..., outputs: _Optional[_Union[FloatTensor, _Mapping]] = ...) -> None: ...

class StepStreamRequest(_message.Message):
    __slots__ = ("session_id", "text", "token_ids", "output", "top_k", "request_id", "model_name", "model_version", "features")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    output: StepOutput
    top_k: int
    request_id: str
    model_name: str
    model_version: str
    features: FloatTensor
    def __init__(self, session_id: _Optional[str] = ..., text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., output: _Optional[_Union[StepOutput, str]] = ..., top_k: _Optional[int] = ..., request_id: _Optional[str] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., features: _Optional[_Union[FloatTensor, _Mapping]] = ...) -> None: ...

class StepStreamResponse(_message.Message):
    __slots__ = ("session_id", "logits", "positions", "top", "tokens_consumed", "steps", "outputs")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    TOKENS_CONSUMED_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    logits: _containers.RepeatedScalarFieldContainer[float]
    positions: int
    top: _containers.RepeatedCompositeFieldContainer[TokenProbability]
    tokens_consumed: int
    steps: int
    outputs: FloatTensor
    def __init__(self, session_id: _Optional[str] = ..., logits: _Optional[_Iterable[float]] = ..., positions: _Optional[int] = ..., top: _Optional[_Iterable[_Union[TokenProbability, _Mapping]]] = ..., tokens_consumed: _Optional[int] = ..., steps: _Optional[int] = ..., outputs: _Optional[_Union[FloatTensor, _Mapping]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("session_id", "prompt", "max_tokens", "temperature", "top_k", "top_p", "seed", "stop", "request_id", "model_name", "model_version")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    prompt: str
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    request_id: str
    model_name: str
    model_version: str
    def __init__(self, session_id: _Optional[str] = ..., prompt: _Optional[str] = ..., max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., request_id: _Optional[str] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("session_id", "text", "token_ids", "finish_reason", "generated_tokens", "prompt_tokens")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: FinishReason
    generated_tokens: int
    prompt_tokens: int
    def __init__(self, session_id: _Optional[str] = ..., text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., generated_tokens: _Optional[int] = ..., prompt_tokens: _Optional[int] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ("model_name", "model_version")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: str
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class GetModelInfoResponse(_message.Message):
    __slots__ = ("name", "version", "provider", "vocab", "num_layers", "hidden_size", "preprocess", "unk_id", "config_json", "max_prompt_tokens", "max_new_tokens", "max_sessions", "max_batch_size", "state_bytes_per_session", "kind", "num_features", "num_outputs", "feature_names", "output_names", "scaling")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    VOCAB_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    PREPROCESS_FIELD_NUMBER: _ClassVar[int]
    UNK_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    MAX_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    STATE_BYTES_PER_SESSION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    NUM_FEATURES_FIELD_NUMBER: _ClassVar[int]
    NUM_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    FEATURE_NAMES_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_NAMES_FIELD_NUMBER: _ClassVar[int]
    SCALING_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    provider: str
    vocab: _containers.RepeatedScalarFieldContainer[str]
    num_layers: int
    hidden_size: int
    preprocess: str
    unk_id: int
    config_json: str
    max_prompt_tokens: int
    max_new_tokens: int
    max_sessions: int
    max_batch_size: int
    state_bytes_per_session: int
    kind: ModelKind
    num_features: int
    num_outputs: int
    feature_names: _containers.RepeatedScalarFieldContainer[str]
    output_names: _containers.RepeatedScalarFieldContainer[str]
    scaling: Scaling
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., provider: _Optional[str] = ..., vocab: _Optional[_Iterable[str]] = ..., num_layers: _Optional[int] = ..., hidden_size: _Optional[int] = ..., preprocess: _Optional[str] = ..., unk_id: _Optional[int] = ..., config_json: _Optional[str] = ..., max_prompt_tokens: _Optional[int] = ..., max_new_tokens: _Optional[int] = ..., max_sessions: _Optional[int] = ..., max_batch_size: _Optional[int] = ..., state_bytes_per_session: _Optional[int] = ..., kind: _Optional[_Union[ModelKind, str]] = ..., num_features: _Optional[int] = ..., num_outputs: _Optional[int] = ..., feature_names: _Optional[_Iterable[str]] = ..., output_names: _Optional[_Iterable[str]] = ..., scaling: _Optional[_Union[Scaling, _Mapping]] = ...) -> None: ...

class ExportSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class ExportSessionResponse(_message.Message):
    __slots__ = ("record",)
    RECORD_FIELD_NUMBER: _ClassVar[int]
    record: bytes
    def __init__(self, record: _Optional[bytes] = ...) -> None: ...

class ImportSessionRequest(_message.Message):
    __slots__ = ("record", "session_id")
    RECORD_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    record: bytes
    session_id: str
    def __init__(self, record: _Optional[bytes] = ..., session_id: _Optional[str] = ...) -> None: ...

class ImportSessionResponse(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class ForkSessionRequest(_message.Message):
    __slots__ = ("session_id", "new_session_id")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    NEW_SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    new_session_id: str
    def __init__(self, session_id: _Optional[str] = ..., new_session_id: _Optional[str] = ...) -> None: ...

class ForkSessionResponse(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelVersionStatus(_message.Message):
    __slots__ = ("version", "state", "reason", "sessions", "memory_bytes")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    version: str
    state: str
    reason: str
    sessions: int
    memory_bytes: int
    def __init__(self, version: _Optional[str] = ..., state: _Optional[str] = ..., reason: _Optional[str] = ..., sessions: _Optional[int] = ..., memory_bytes: _Optional[int] = ...) -> None: ...

class ModelStatus(_message.Message):
    __slots__ = ("name", "version_policy", "versions", "is_default")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_POLICY_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    name: str
    version_policy: str
    versions: _containers.RepeatedCompositeFieldContainer[ModelVersionStatus]
    is_default: bool
    def __init__(self, name: _Optional[str] = ..., version_policy: _Optional[str] = ..., versions: _Optional[_Iterable[_Union[ModelVersionStatus, _Mapping]]] = ..., is_default: _Optional[bool] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "model_control_mode")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    MODEL_CONTROL_MODE_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelStatus]
    model_control_mode: str
    def __init__(self, models: _Optional[_Iterable[_Union[ModelStatus, _Mapping]]] = ..., model_control_mode: _Optional[str] = ...) -> None: ...

class LoadModelRequest(_message.Message):
    __slots__ = ("model_name",)
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    def __init__(self, model_name: _Optional[str] = ...) -> None: ...

class LoadModelResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: ModelStatus
    def __init__(self, model: _Optional[_Union[ModelStatus, _Mapping]] = ...) -> None: ...

class UnloadModelRequest(_message.Message):
    __slots__ = ("model_name",)
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    def __init__(self, model_name: _Optional[str] = ...) -> None: ...

class UnloadModelResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: ModelStatus
    def __init__(self, model: _Optional[_Union[ModelStatus, _Mapping]] = ...) -> None: ...

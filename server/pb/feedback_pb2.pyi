from . import grpc_service_pb2 as _grpc_service_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FeedbackStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FEEDBACK_STATUS_UNSPECIFIED: _ClassVar[FeedbackStatus]
    FEEDBACK_STATUS_ACCEPTED: _ClassVar[FeedbackStatus]
    FEEDBACK_STATUS_DUPLICATE: _ClassVar[FeedbackStatus]
    FEEDBACK_STATUS_PENDING: _ClassVar[FeedbackStatus]
FEEDBACK_STATUS_UNSPECIFIED: FeedbackStatus
FEEDBACK_STATUS_ACCEPTED: FeedbackStatus
FEEDBACK_STATUS_DUPLICATE: FeedbackStatus
FEEDBACK_STATUS_PENDING: FeedbackStatus

class TruthTensor(_message.Message):
    __slots__ = ("name", "datatype", "shape", "contents")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DATATYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    CONTENTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    datatype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    contents: _grpc_service_pb2.InferTensorContents
    def __init__(self, name: _Optional[str] = ..., datatype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., contents: _Optional[_Union[_grpc_service_pb2.InferTensorContents, _Mapping]] = ...) -> None: ...

class TruthTensors(_message.Message):
    __slots__ = ("tensors",)
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    tensors: _containers.RepeatedCompositeFieldContainer[TruthTensor]
    def __init__(self, tensors: _Optional[_Iterable[_Union[TruthTensor, _Mapping]]] = ...) -> None: ...

class FeedbackRequest(_message.Message):
    __slots__ = ("prediction_id", "model_name", "model_version", "label", "value", "tensors", "reward", "feedback_id", "sent_at_unix_ms")
    PREDICTION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    FEEDBACK_ID_FIELD_NUMBER: _ClassVar[int]
    SENT_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    prediction_id: str
    model_name: str
    model_version: str
    label: str
    value: float
    tensors: TruthTensors
    reward: float
    feedback_id: str
    sent_at_unix_ms: int
    def __init__(self, prediction_id: _Optional[str] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., label: _Optional[str] = ..., value: _Optional[float] = ..., tensors: _Optional[_Union[TruthTensors, _Mapping]] = ..., reward: _Optional[float] = ..., feedback_id: _Optional[str] = ..., sent_at_unix_ms: _Optional[int] = ...) -> None: ...

class FeedbackResponse(_message.Message):
    __slots__ = ("prediction_id", "feedback_id", "status")
    PREDICTION_ID_FIELD_NUMBER: _ClassVar[int]
    FEEDBACK_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    prediction_id: str
    feedback_id: str
    status: FeedbackStatus
    def __init__(self, prediction_id: _Optional[str] = ..., feedback_id: _Optional[str] = ..., status: _Optional[_Union[FeedbackStatus, str]] = ...) -> None: ...

class StreamFeedbackResponse(_message.Message):
    __slots__ = ("received", "accepted", "duplicate", "pending")
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    received: int
    accepted: int
    duplicate: int
    pending: int
    def __init__(self, received: _Optional[int] = ..., accepted: _Optional[int] = ..., duplicate: _Optional[int] = ..., pending: _Optional[int] = ...) -> None: ...

class FeedbackReportRequest(_message.Message):
    __slots__ = ("model_name", "max_unknown_ids")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MAX_UNKNOWN_IDS_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    max_unknown_ids: int
    def __init__(self, model_name: _Optional[str] = ..., max_unknown_ids: _Optional[int] = ...) -> None: ...

class FeedbackReportResponse(_message.Message):
    __slots__ = ("predictions", "feedback", "joined", "pending", "unknown", "unknown_ids", "reused_ids", "unreadable_segments")
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    FEEDBACK_FIELD_NUMBER: _ClassVar[int]
    JOINED_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_IDS_FIELD_NUMBER: _ClassVar[int]
    REUSED_IDS_FIELD_NUMBER: _ClassVar[int]
    UNREADABLE_SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    predictions: int
    feedback: int
    joined: int
    pending: int
    unknown: int
    unknown_ids: _containers.RepeatedScalarFieldContainer[str]
    reused_ids: int
    unreadable_segments: int
    def __init__(self, predictions: _Optional[int] = ..., feedback: _Optional[int] = ..., joined: _Optional[int] = ..., pending: _Optional[int] = ..., unknown: _Optional[int] = ..., unknown_ids: _Optional[_Iterable[str]] = ..., reused_ids: _Optional[int] = ..., unreadable_segments: _Optional[int] = ...) -> None: ...

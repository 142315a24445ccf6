//! The protobuf codec of the five services: prost's, except that a request
//! that does not decode (invalid UTF-8 in a string, a truncated or malformed
//! message) is the caller's fault, `INVALID_ARGUMENT`, where tonic-prost
//! answers `INTERNAL` (found by the gRPC-level fuzzer). build.rs points the
//! generated servers and clients at it.

use std::marker::PhantomData;

use prost::Message;
use tonic::{
    Code, Status,
    codec::{BufferSettings, Codec, DecodeBuf, Decoder},
};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// prost encoding; decoding errors are `INVALID_ARGUMENT`.
#[derive(Debug, Clone)]
pub struct ProtoCodec<T, U> {
    inner: ProstCodec<T, U>,
}

impl<T, U> Default for ProtoCodec<T, U> {
    fn default() -> Self {
        Self { inner: ProstCodec::default() }
    }
}

impl<T, U> Codec for ProtoCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = MessageDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.inner.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        MessageDecoder { inner: self.inner.decoder(), _message: PhantomData }
    }
}

/// prost's decoder with its one error re-classified. On the client side (our
/// own tests and tools) it applies to responses alike.
#[derive(Debug)]
pub struct MessageDecoder<U> {
    inner: ProstDecoder<U>,
    _message: PhantomData<U>,
}

impl<U: Message + Default> Decoder for MessageDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.inner.decode(src).map_err(|status| match status.code() {
            // prost's text names the message and field ("GetRequest.key:
            // invalid string value: data is not UTF-8 encoded"): the
            // caller's own input, safe to return.
            Code::Internal => Status::invalid_argument(format!("request: not a valid message ({})", status.message())),
            _ => status,
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.inner.buffer_settings()
    }
}

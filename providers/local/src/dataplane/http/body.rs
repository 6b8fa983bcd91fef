//! The body of every response the proxy sends: a target's body bounded by the request
//! deadline, or a short body of its own. An enum rather than a boxed body, so a proxied
//! response costs no allocation for its body type.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::time::Sleep;

use super::direct;
use super::upstream::Pooled;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub enum ProxyBody {
    /// A local answer (errors, redirects); `None` once sent.
    Local(Option<Bytes>),
    /// A target's body, cut off when the exchange's deadline passes; its connection goes
    /// back to the pool once the body has ended cleanly.
    Upstream {
        body: Incoming,
        deadline: Pin<Box<Sleep>>,
        pooled: Option<Pooled>,
        ended: bool,
    },
    /// A bodiless request's answer, read straight off a pooled connection ([`direct`]), cut
    /// off the same way.
    Direct {
        body: direct::Body,
        deadline: Pin<Box<Sleep>>,
    },
}

#[derive(Debug, thiserror::Error)]
#[error("the target's response outlasted the request timeout")]
pub struct DeadlineExceeded;

impl ProxyBody {
    pub fn text(text: &'static str) -> Self {
        ProxyBody::Local(Some(Bytes::from_static(text.as_bytes())))
    }

    pub fn empty() -> Self {
        ProxyBody::Local(None)
    }

    pub fn upstream(body: Incoming, deadline: Pin<Box<Sleep>>, pooled: Option<Pooled>) -> Self {
        ProxyBody::Upstream {
            body,
            deadline,
            pooled,
            ended: false,
        }
    }

    pub fn direct(body: direct::Body, deadline: Pin<Box<Sleep>>) -> Self {
        ProxyBody::Direct { body, deadline }
    }
}

impl Drop for ProxyBody {
    /// Only a body read to its end leaves the connection ready for another exchange; one cut
    /// short (client gone, error, deadline) drops the connection, which closes it.
    fn drop(&mut self) {
        if let ProxyBody::Upstream {
            body,
            pooled,
            ended,
            ..
        } = self
            && (*ended || body.is_end_stream())
            && let Some(pooled) = pooled.take()
        {
            pooled.release();
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ProxyBody::Local(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            ProxyBody::Upstream {
                body,
                deadline,
                ended,
                ..
            } => {
                match Pin::new(body).poll_frame(cx) {
                    Poll::Ready(None) => {
                        *ended = true;
                        Poll::Ready(None)
                    }
                    Poll::Ready(Some(frame)) => Poll::Ready(Some(frame.map_err(Into::into))),
                    // Only a waiting body can overrun; a body that keeps flowing is checked
                    // when it next waits.
                    Poll::Pending => match deadline.as_mut().poll(cx) {
                        Poll::Ready(()) => Poll::Ready(Some(Err(DeadlineExceeded.into()))),
                        Poll::Pending => Poll::Pending,
                    },
                }
            }
            ProxyBody::Direct { body, deadline } => match Pin::new(body).poll_frame(cx) {
                Poll::Ready(frame) => Poll::Ready(frame.map(|f| f.map_err(Into::into))),
                Poll::Pending => match deadline.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(DeadlineExceeded.into()))),
                    Poll::Pending => Poll::Pending,
                },
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Local(data) => data.is_none(),
            ProxyBody::Upstream { body, .. } => body.is_end_stream(),
            ProxyBody::Direct { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Local(data) => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            ProxyBody::Upstream { body, .. } => body.size_hint(),
            ProxyBody::Direct { body, .. } => body.size_hint(),
        }
    }
}

//! A minimal MLLP client: send one message, wait for the framed answer. Used by the demo and the
//! benchmark; the forwarders build on it.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::hl7::mllp::{self, Deframer, Event};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connection failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the peer closed the connection without answering")]
    Closed,
    #[error("the answer is larger than {0} bytes")]
    Oversized(usize),
}

/// An MLLP connection over any stream (TCP or TLS).
pub struct MllpClient<S> {
    stream: S,
    deframer: Deframer,
    buf: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> MllpClient<S> {
    pub fn new(stream: S) -> Self {
        Self::with_limit(stream, 1024 * 1024)
    }

    /// A client accepting answers of at most `limit` bytes.
    pub fn with_limit(stream: S, limit: usize) -> Self {
        MllpClient {
            stream,
            deframer: Deframer::new(limit),
            buf: vec![0u8; 16 * 1024],
        }
    }

    /// Sends `payload` framed and returns the payload of the next frame received.
    pub async fn exchange(&mut self, payload: &[u8]) -> Result<Vec<u8>, ClientError> {
        self.send(payload).await?;
        self.receive().await
    }

    /// Sends `payload` framed.
    pub async fn send(&mut self, payload: &[u8]) -> Result<(), ClientError> {
        // The framed copy is message content (PHI, when forwarding): wiped once sent.
        let framed = zeroize::Zeroizing::new(mllp::encode(payload));
        self.stream.write_all(&framed).await?;
        self.stream.flush().await?;
        Ok(())
    }

    /// The payload of the next frame received.
    pub async fn receive(&mut self) -> Result<Vec<u8>, ClientError> {
        loop {
            match self.deframer.next_event() {
                Some(Event::Frame(p)) => return Ok(p),
                Some(Event::Oversized { limit, mut prefix }) => {
                    crate::wipe::vec(&mut prefix);
                    return Err(ClientError::Oversized(limit));
                }
                None => {}
            }
            let n = self.stream.read(&mut self.buf).await?;
            if n == 0 {
                return Err(ClientError::Closed);
            }
            self.deframer.push(&self.buf[..n]);
        }
    }

    pub fn into_inner(self) -> S {
        self.stream
    }
}

"""Re-exports of :mod:`interlatent.backends` under their earlier path."""

from interlatent.backends import (Backend, Encoding, HFBackend, HFEncoderBackend, TL3Backend, TL4Backend,
                                  TLEncoderBackend, encode_texts, find_blocks, hf_module_for, make_backend,
                                  stateless_backend)

TLBackend = TL3Backend

__all__ = ["Backend", "Encoding", "HFBackend", "HFEncoderBackend", "TL3Backend", "TL4Backend", "TLBackend",
           "TLEncoderBackend", "encode_texts", "find_blocks", "hf_module_for", "make_backend", "stateless_backend"]

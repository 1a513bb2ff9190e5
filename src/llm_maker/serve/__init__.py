"""Generation with the KV cache (streaming, greedy or sampled) and the terminal chat."""
from llm_maker.serve.chat import chat_repl, fit_history
from llm_maker.serve.generate import (Generation, complete, complete_ids, decode_stream, generate,
                                      stream_text)

__all__ = ["Generation", "chat_repl", "complete", "complete_ids", "decode_stream", "fit_history", "generate",
           "stream_text"]

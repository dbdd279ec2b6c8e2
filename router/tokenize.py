"""vLLM's /tokenize and /detokenize: clients count a prompt's tokens (a chat rendered by
the same template, tools included, as /v1/chat/completions renders it) or read token ids
back, with the router's own tokenizer and no worker involved."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt

from engine.errors import InvalidRequestError
from router.errors import model_not_found
from router.protocol import ChatMessage, check_messages
from router.tools import plan_tools

if TYPE_CHECKING:
    from fastapi import FastAPI

    from router.app import Router


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: StrictBool = True  # prompt: the tokenizer's BOS and the like
    add_generation_prompt: StrictBool = True  # messages: end with the assistant's header
    tools: list[Any] | None = None
    return_token_strs: StrictBool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    tokens: list[StrictInt]


def install_tokenize_routes(app: FastAPI, router: Router) -> None:
    served = router.cfg.served_model_name

    def token_ids(req: TokenizeRequest) -> list[int]:
        tok = router.tok
        if req.messages is None:
            return tok.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        check_messages(req.messages)
        tools = plan_tools(req.tools, None, router.tool_format)
        return tok.chat_prompt_ids([m.for_template() for m in req.messages],
                                   tools.tools if tools else None, req.add_generation_prompt)

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        if req.model != served:
            return model_not_found(req.model, served)
        tok = router.tok
        if (req.prompt is None) == (req.messages is None):
            raise InvalidRequestError("give either prompt or messages", param="prompt")
        # off the event loop, as chat and completions tokenize: other streams go on
        ids = await asyncio.to_thread(token_ids, req)
        body: dict = {"count": len(ids), "max_model_len": router.pool.max_model_len,
                      "tokens": ids}
        if req.return_token_strs:
            body["token_strs"] = [tok.tokenizer.id_to_token(i) for i in ids]
        return body

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        if req.model != served:
            return model_not_found(req.model, served)
        vocab = router.tok.vocab_size
        if any(not 0 <= t < vocab for t in req.tokens):
            raise InvalidRequestError(f"tokens must be ids in [0, {vocab})", param="tokens")
        return {"prompt": router.tok.decode(req.tokens, skip_special_tokens=False)}

"""`forensics mcp`: an MCP client over stdio lists the tools and calls them; masks come back as PNG."""

from __future__ import annotations

import base64
import io
import sys

import anyio
import numpy as np
from mcp import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from PIL import Image

from experts.samples import splice


async def _session_calls(path: str, data_b64: str) -> tuple:
    server = StdioServerParameters(
        command=sys.executable,
        args=["-m", "assistant", "mcp", "--experts", "ela,jpeg,metadata,manipulation,ai_generated"],
    )
    async with stdio_client(server) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        listed = await session.list_tools()
        ela = await session.call_tool("ela", {"image": path})
        fused = await session.call_tool("analyze_image", {"image": data_b64})
        bad = await session.call_tool("ela", {"image": base64.b64encode(b"not an image at all" * 8).decode()})
        return listed, ela, fused, bad


def _png(block) -> np.ndarray:
    assert block.type == "image" and block.mime_type == "image/png"
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(block.data))))


def test_mcp_client_lists_the_tools_and_gets_masks_as_images(tmp_path):
    sample = splice()
    path = tmp_path / "splice.jpg"
    path.write_bytes(sample.data)
    listed, ela, fused, bad = anyio.run(_session_calls, str(path), base64.b64encode(sample.data).decode())

    tools = {tool.name: tool for tool in listed.tools}
    assert set(tools) == {
        "analyze_image",
        "ela",
        "jpeg",
        "metadata",
        "manipulation",
        "ai_generated",
        "ask_forensics_assistant",
    }
    assert tools["ela"].input_schema["required"] == ["image"]
    assert "qualities" in tools["ela"].input_schema["properties"]  # the expert's settings, typed

    text = ela.content[0].text
    assert ela.content[0].type == "text" and "score" in text
    images = [_png(block) for block in ela.content if block.type == "image"]
    mask = images[0]
    assert mask.shape == (400, 600) and set(np.unique(mask)) <= {0, 255}
    marked = mask > 0
    assert marked.any() and (marked & sample.mask).sum() > 0.5 * marked.sum()  # it marks the pasted cat

    assert "Fused verdict" in fused.content[0].text and "manipulated" in fused.content[0].text
    fused_mask = _png(next(b for b in fused.content if b.type == "image"))
    assert fused_mask.shape == (400, 600)

    assert bad.content[0].text.startswith("Error: <base64>: not a supported image")

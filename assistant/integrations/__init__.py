"""The experts and the assistant for other agent frameworks: LangChain tools and chat model
(langchain_tools.py, langchain_model.py) and an MCP server (mcp_server.py). Each module imports its
framework only when it is imported itself."""

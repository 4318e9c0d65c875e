"""Beyond the terminal: `gemma-chat serve`, an OpenAI-compatible server on our engine
(server.py runs app.py over scheduler.py), and `gemma-chat --endpoint URL`, the chat against any
such server (remote.py).

Nothing here is imported by a local chat; importing this package itself loads nothing, so the
endpoint client never loads the engine and the server never loads the openai client.
"""

"""Setup-time tools: AWS discovery, the doctor, the builders' /etc/hosts lines.

They run before or beside the proxy, never inside it, and nothing on the data path imports them.
"""

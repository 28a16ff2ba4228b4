import asyncio
import os
from datetime import timedelta
from opensandbox import Sandbox
from opensandbox.config import ConnectionConfig

async def main():
    config = ConnectionConfig(
        domain=os.getenv("SANDBOX_DOMAIN", "localhost:8080"),
        api_key=os.getenv("SANDBOX_API_KEY"),
        request_timeout=timedelta(seconds=60),
    )

    # Create a sandbox (will be allocated from BatchSandbox/Pool)
    sandbox = await Sandbox.create(
        "opensandbox/code-interpreter:v1.0.1",
        connection_config=config,
        timeout=timedelta(minutes=10),
    )

    async with sandbox:
        execution = await sandbox.commands.run("echo hello from batch sandbox")
        stdout = execution.logs.stdout[0].text if execution.logs.stdout else ""
        print(f"Output: {stdout}")
        await sandbox.kill()

if __name__ == "__main__":
    asyncio.run(main())

"""SMTPy "DKIM Signer": sign a message with the sender domain's key.

Keys live in ``dkim.keys_dir`` (./ferry-data/dkim); make one with
``ferry dkim keygen example.com`` and publish the TXT record it prints. Without a key
the message comes back unsigned. The signed message is written to stdout.

    MAIL_FROM=sender@example.com python examples/dkim_signing.py
"""

import asyncio
import email.policy
import os
import sys
from email.message import EmailMessage

from ferry import sign_email_dkim

MAIL_FROM = os.environ.get("MAIL_FROM", "sender@example.com")
TO = os.environ.get("TO", "someone@example.net")


async def main() -> None:
    email_message = EmailMessage()
    email_message["From"], email_message["To"] = MAIL_FROM, TO
    email_message["Subject"] = "Signed"
    email_message.set_content("DKIM says this really comes from my domain.")

    # Automatic signing (looks up key by domain)
    signed_message = await sign_email_dkim(message=email_message, mail_from=MAIL_FROM)

    print("signed" if signed_message["DKIM-Signature"] else "unsigned", file=sys.stderr)
    sys.stdout.buffer.write(signed_message.as_bytes(policy=email.policy.SMTP))


if __name__ == "__main__":
    asyncio.run(main())

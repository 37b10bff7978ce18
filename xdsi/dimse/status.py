"""DIMSE status codes used by the SCPs (PS3.4 and PS3.7 Annex C), named once.

Success, Pending, Cancel and Move Destination Unknown are pynetdicom's ``pynetdicom.status.Status``;
the codes it does not name are here.
"""

# C-STORE (PS3.4 B.2.3)
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
DATASET_DOES_NOT_MATCH = 0xA900  # Error: Data Set does not match SOP Class
SOP_CLASS_NOT_SUPPORTED = 0x0122  # Refused: SOP Class not supported (PS3.7 C.5.x general status)
# C-FIND / C-MOVE / C-GET (PS3.4 C.4)
IDENTIFIER_DOES_NOT_MATCH = 0xA900
FIND_UNABLE_TO_PROCESS = 0xC001
MOVE_UNABLE_TO_PROCESS = 0xC515
UNABLE_TO_PERFORM_SUBOPERATIONS = 0xA702  # Refused: Out of Resources
# N-ACTION (PS3.7 C)
NO_SUCH_ACTION_TYPE = 0x0123
INVALID_ARGUMENT_VALUE = 0x0115
PROCESSING_FAILURE = 0x0110
# Storage Commitment failure reasons (PS3.3 C.14.1.1)
FAILURE_PROCESSING = 0x0110
FAILURE_NO_SUCH_OBJECT_INSTANCE = 0x0112
FAILURE_CLASS_INSTANCE_CONFLICT = 0x0119
FAILURE_DUPLICATE_TRANSACTION_UID = 0x0131

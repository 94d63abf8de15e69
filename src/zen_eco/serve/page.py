"""The chat page at / — being written."""

from fastapi import APIRouter

router = APIRouter()

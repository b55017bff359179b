"""The ledger's rules as data (shared/spec/ledger.md): what a lead can become, who may do what,
what actions exist and how the weekly report labels them. Code reads these tables; no chains of ifs.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

# Re-exported: the ledger's code reads a model's status and its labels from here, with the rest.
from tracecode.rules.model_status import DEFAULT as DEFAULT_MODEL_STATUS  # noqa: F401
from tracecode.rules.model_status import PILOT as PILOT
from tracecode.rules.model_status import STATUSES as MODEL_STATUS_LABELS  # noqa: F401


class Source(str, Enum):
    MODEL = "MODEL"
    NATIONAL = "NATIONAL"
    PROVINCIAL = "PROVINCIAL"
    COMPLAINT = "COMPLAINT"
    LIVE = "LIVE"


SOURCE_LABELS = {Source.MODEL: "模型线索", Source.NATIONAL: "国家局移交", Source.PROVINCIAL: "省局移交",
                 Source.COMPLAINT: "举报投诉", Source.LIVE: "实时重复结算"}
# Handed-down sources: they arrive in batches and need a handling report (处理报告) to close.
HANDED_DOWN = frozenset({Source.NATIONAL, Source.PROVINCIAL, Source.COMPLAINT})
# The model name LIVE leads carry (the audit stream's DUPLICATE attempts at the counter).
LIVE_MODEL = "LIVE_DUPLICATE"


class Status(str, Enum):
    NEW = "NEW"
    IN_PROGRESS = "IN_PROGRESS"
    CONFIRMED = "CONFIRMED"
    UNFOUNDED = "UNFOUNDED"
    CLOSED = "CLOSED"


STATUS_LABELS = {Status.NEW: "待核查", Status.IN_PROGRESS: "核查中", Status.CONFIRMED: "查证属实",
                 Status.UNFOUNDED: "查证不属实", Status.CLOSED: "已办结"}
OPEN_STATUSES = frozenset({Status.NEW, Status.IN_PROGRESS, Status.CONFIRMED, Status.UNFOUNDED})


class Perm(str, Enum):
    """Permissions (Django's, on the Lead model); groups get them in roles.py."""
    VIEW_ALL = "view_all_leads"        # see every lead (else only those assigned to you)
    WORK = "work_lead"                 # work the leads assigned to you: findings, evidence notes
    ASSIGN = "assign_lead"
    REVIEW = "review_lead"             # send back, close
    RECORD_ACTION = "record_action"    # record 处理结果 on a lead
    PROPOSE_SANCTION = "propose_sanction"
    APPROVE_SANCTION = "approve_sanction"
    IMPORT = "import_leads"
    SUBMIT_REPORT = "submit_report"
    VIEW_REPORT = "view_report"
    PROPOSE_CONFIG = "propose_model_config"  # propose a models' configuration with its backtest
    APPROVE_CONFIG = "approve_model_config"  # adopt or reject one (never one's own)


@dataclass(frozen=True)
class Role:
    label: str
    perms: frozenset[Perm]


ROLES = {
    # 核查员: works the leads assigned to them, proposes sanctions, never imposes one.
    "inspector": Role("核查员", frozenset({Perm.WORK, Perm.RECORD_ACTION, Perm.PROPOSE_SANCTION, Perm.VIEW_REPORT,
                                         Perm.PROPOSE_CONFIG})),
    # 审核人 (科室负责人): assigns, reviews, closes, approves (imposes) and lifts sanctions, imports, reports.
    "supervisor": Role("审核人", frozenset({Perm.VIEW_ALL, Perm.WORK, Perm.ASSIGN, Perm.REVIEW, Perm.RECORD_ACTION,
                                           Perm.PROPOSE_SANCTION, Perm.APPROVE_SANCTION, Perm.IMPORT,
                                           Perm.SUBMIT_REPORT, Perm.VIEW_REPORT, Perm.PROPOSE_CONFIG,
                                           Perm.APPROVE_CONFIG})),
    # 审计: reads everything, changes nothing.
    "auditor": Role("审计（只读）", frozenset({Perm.VIEW_ALL, Perm.VIEW_REPORT})),
}


class Cause(str, Enum):
    """Why a lead was found true or not: separates fraud from technical causes, so a double scan
    at the counter or a data error at issuance never counts as 查证属实."""
    FRAUD_RESALE = "FRAUD_RESALE"
    FRAUD_SWAP = "FRAUD_SWAP"
    FRAUD_STOCKPILING = "FRAUD_STOCKPILING"
    FRAUD_OTHER = "FRAUD_OTHER"
    TECH_DOUBLE_SCAN = "TECH_DOUBLE_SCAN"
    TECH_DATA_ERROR = "TECH_DATA_ERROR"
    TECH_RETURN_RESOLD = "TECH_RETURN_RESOLD"
    NO_VIOLATION = "NO_VIOLATION"


@dataclass(frozen=True)
class CauseRule:
    label: str
    fraud: bool       # counts as 查证属实
    technical: bool   # a technical cause (not fraud, not a clean bill either)


CAUSES = {
    Cause.FRAUD_RESALE: CauseRule("倒卖/回流药品", True, False),
    Cause.FRAUD_SWAP: CauseRule("串换药品", True, False),
    Cause.FRAUD_STOCKPILING: CauseRule("超量囤药", True, False),
    Cause.FRAUD_OTHER: CauseRule("其他欺诈骗保", True, False),
    Cause.TECH_DOUBLE_SCAN: CauseRule("技术原因：柜台重复扫码", False, True),
    Cause.TECH_DATA_ERROR: CauseRule("技术原因：赋码数据错误", False, True),
    # A pack the buyer returned, the return never entered (no ReverseDispense), sold again.
    Cause.TECH_RETURN_RESOLD: CauseRule("技术原因：退货误售", False, True),
    Cause.NO_VIOLATION: CauseRule("查无违规", False, False),
}


# The conclusion as the weekly report and the effectiveness page count it: a lead is concluded
# once an inspector found it true or not (a supervisor may have closed it since; sent back, it
# is open again), and confirmed (查证属实) only with a fraud cause. A technical cause (a double
# scan, a data error) is therefore counted as unfounded, never as 查证属实.
CONCLUDED = frozenset({Status.CONFIRMED, Status.UNFOUNDED, Status.CLOSED})
FRAUD_CAUSES = frozenset(c.value for c, rule in CAUSES.items() if rule.fraud)


def is_concluded(status: str) -> bool:
    return status in {s.value for s in CONCLUDED}


def is_confirmed(status: str, cause: str) -> bool:
    return cause in FRAUD_CAUSES and status in (Status.CONFIRMED.value, Status.CLOSED.value)


@dataclass(frozen=True)
class Transition:
    to: Status
    perm: Perm           # the permission it needs
    own_only: bool       # only the assigned inspector (or someone with VIEW_ALL+REVIEW) may do it
    needs_cause: tuple[bool, ...] = ()  # allowed values of CAUSES[cause].fraud; () = no cause asked
    label: str = ""


# from -> the transitions allowed. Assignment (NEW -> IN_PROGRESS) goes through workflow.assign.
TRANSITIONS: dict[Status, tuple[Transition, ...]] = {
    Status.NEW: (),
    Status.IN_PROGRESS: (
        Transition(Status.CONFIRMED, Perm.WORK, True, (True,), "查证属实"),
        Transition(Status.UNFOUNDED, Perm.WORK, True, (False,), "查证不属实"),
    ),
    Status.CONFIRMED: (
        Transition(Status.IN_PROGRESS, Perm.REVIEW, False, (), "退回重新核查"),
        Transition(Status.CLOSED, Perm.REVIEW, False, (), "办结"),
    ),
    Status.UNFOUNDED: (
        Transition(Status.IN_PROGRESS, Perm.REVIEW, False, (), "退回重新核查"),
        Transition(Status.CLOSED, Perm.REVIEW, False, (), "办结"),
    ),
    Status.CLOSED: (),
}


class Party(str, Enum):
    INSTITUTION = "INSTITUTION"  # 定点医疗机构 / 定点药店 (a site)
    PERSON = "PERSON"            # 参保人员


@dataclass(frozen=True)
class ActionType:
    code: str
    label: str
    party: Party
    money: bool = False          # the figure is an amount in 万元
    reduced_loss: bool = False   # keeps 月营业额, 违规额, 罚没额
    sanction: str = ""           # the Admin API SanctionKind it takes effect as at settlement


ACTION_TYPES: tuple[ActionType, ...] = (
    ActionType("INTERVIEW", "约谈限期整改", Party.INSTITUTION),
    ActionType("CRITICISM", "通报批评", Party.INSTITUTION),
    ActionType("SUSPEND_SERVICE", "暂停医保服务", Party.INSTITUTION, reduced_loss=True, sanction="SUSPEND_SERVICE"),
    ActionType("TERMINATE", "解除定点协议", Party.INSTITUTION, reduced_loss=True, sanction="TERMINATE_AGREEMENT"),
    ActionType("BLACKLIST", "列入医保黑名单", Party.INSTITUTION, sanction="BLACKLIST"),
    ActionType("PENALTY", "行政处罚", Party.INSTITUTION),
    ActionType("JUDICIAL", "移交司法机关", Party.INSTITUTION),
    ActionType("RECOVER_FUND", "追回医保基金", Party.INSTITUTION, money=True),
    ActionType("RECOVER_PATIENT", "为患者追回资金", Party.INSTITUTION, money=True),
    ActionType("OTHER", "其他处理情形", Party.INSTITUTION),
    ActionType("P_INTERVIEW", "约谈", Party.PERSON),
    ActionType("P_SUSPEND_CARD", "暂停医保卡结算", Party.PERSON, sanction="SUSPEND_CARD"),
    ActionType("P_PENALTY", "行政处罚", Party.PERSON),
    ActionType("P_JUDICIAL", "移交司法机关", Party.PERSON),
    ActionType("P_OTHER", "其他处理形式", Party.PERSON),
    ActionType("P_RECOVER", "追回骗取医保基金", Party.PERSON, money=True),
)
ACTIONS = {a.code: a for a in ACTION_TYPES}
SANCTION_ACTIONS = {a.code: a for a in ACTION_TYPES if a.sanction}
SANCTION_BY_KIND = {a.sanction: a for a in ACTION_TYPES if a.sanction}
# Only sanctions whose end the proposer may set (the API refuses valid_until on the others).
SANCTION_MAY_END = frozenset({"SUSPEND_SERVICE", "SUSPEND_CARD"})

SITE_KIND_LABELS = {"INSTITUTION": "定点医疗机构", "PHARMACY": "定点药店", "": "未知"}
RISK_ORDER = {"HIGH": 0, "MEDIUM": 1, "LOW": 2, "": 3}
RISK_LABELS = {"HIGH": "高", "MEDIUM": "中", "LOW": "低", "": "-"}
SUBJECT_LABELS = {"SITE": "定点医药机构", "INSURED": "参保人", "RING": "机构团伙"}


# --- a pharmacy's answers to its own alerts (issue 28; alerts.py) ----------------------------

@dataclass(frozen=True)
class AnswerCause:
    label: str
    # The lead cause an inspector's acceptance concludes with (查证不属实): a technical cause;
    # None when the answer explains nothing the ledger can conclude on by itself (其他).
    lead_cause: Cause | None


# The pharmacy's table of causes, by its stable code (the JSON API's `cause`).
ANSWER_CAUSES = {
    "DOUBLE_SCAN": AnswerCause("柜台重复扫码", Cause.TECH_DOUBLE_SCAN),
    "RETURN_RESOLD": AnswerCause("退货误售", Cause.TECH_RETURN_RESOLD),
    "DATA_ERROR": AnswerCause("赋码数据错误", Cause.TECH_DATA_ERROR),
    "OTHER": AnswerCause("其他", None),
}
# Every answer cause that concludes is a technical one: accepting an answer never finds fraud.
assert all(a.lead_cause is None or CAUSES[a.lead_cause].technical for a in ANSWER_CAUSES.values())

# Kinds of alert a counter raises (the audit feed's events the ledger keeps for the pharmacy).
ALERT_KINDS = {"ATTEMPT": "结算预警", "REFUSED": "结算拒绝", "NOTICE": "事前提醒", "RECEIVE": "入库预警"}
# Unanswered alerts are counted past these ages (metrics, alert rule): reminders as in Europe's
# verification systems, after 48 hours and after 5 days.
ALERT_AGES_H = {"48h": 48, "5d": 120}

package spec

import (
	"fmt"
	"strings"
)

// kvTransferFlags are the engine flags the plan sets from engine.kvTransfer.
var kvTransferFlags = []string{"--kv-transfer-config"}

// validateKVTransfer checks engine.kvTransfer on its own; CheckPair
// checks a prefill deployment against a decode one.
func validateKVTransfer(d *Deployment) []error {
	var errs []error
	bad := func(field, format string, args ...any) {
		errs = append(errs, &Error{Field: field, Msg: fmt.Sprintf(format, args...)})
	}
	e, k := &d.Engine, d.Engine.KVTransfer
	if k.Role != RolePrefill && k.Role != RoleDecode {
		bad("engine.kvTransfer.role", "must be %s or %s, got %q", RolePrefill, RoleDecode, k.Role)
	}
	if k.LeaseSeconds < 0 || k.LeaseSeconds > 86400 {
		bad("engine.kvTransfer.leaseSeconds", "must be 0 to 86400, got %d", k.LeaseSeconds)
	}
	apiHi := e.Port
	if dp := e.DataParallel; dp != nil {
		apiHi = e.Port + dp.APIPorts() - 1
	}
	// ports checks a band of ports of field against the API and master ports.
	ports := func(field string, lo, hi int, what string) {
		switch {
		case lo < 1 || hi > 65535:
			bad(field, "needs ports %d-%d (%s) within 1-65535", lo, hi, what)
		case lo <= apiHi && e.Port <= hi:
			bad(field, "ports %d-%d (%s) clash with the API server's %d-%d", lo, hi, what, e.Port, apiHi)
		case lo <= e.MasterPort && e.MasterPort <= hi:
			bad(field, "ports %d-%d (%s) include engine.masterPort (%d)", lo, hi, what, e.MasterPort)
		}
	}
	switch e.Kind {
	case EngineVLLM, EngineRayVLLM, EngineCommand:
		// A command engine with kvTransfer speaks vLLM's NixlConnector
		// protocol (kv_transfer_params): the router drives it as it
		// drives vLLM, and its templates get the role and side channel.
		if k.Connector != ConnectorNIXL {
			what := "vLLM"
			if e.Kind == EngineCommand {
				what = "kind command (a program that speaks vLLM's NixlConnector protocol)"
			}
			bad("engine.kvTransfer.connector", "unknown connector %q for %s; nixl (vLLM's NixlConnector)", k.Connector, what)
		}
		if k.FailurePolicy != "fail" && k.FailurePolicy != "recompute" {
			bad("engine.kvTransfer.failurePolicy", "must be fail or recompute, got %q", k.FailurePolicy)
		}
		if k.BootstrapPort != 0 {
			bad("engine.kvTransfer.bootstrapPort", "is SGLang's (kind %s); vLLM's NixlConnector meets its peers on sideChannelPort", EngineSGLang)
		}
		band := 1
		if dp := e.DataParallel; dp != nil && dp.Size > 0 {
			band = dp.Size
		}
		ports("engine.kvTransfer.sideChannelPort", k.SideChannelPort, k.SideChannelPort+band-1, "one per DP rank")
		if e.Kind != EngineCommand {
			errs = append(errs, refuseOwned(e.Args, kvTransferFlags, "engine.kvTransfer")...)
		}
	case EngineSGLang:
		if k.Connector != ConnectorNIXL && k.Connector != ConnectorMooncake {
			bad("engine.kvTransfer.connector", "unknown connector %q for SGLang; %s or %s (--disaggregation-transfer-backend)", k.Connector, ConnectorMooncake, ConnectorNIXL)
		}
		for _, f := range []struct {
			field string
			set   bool
		}{{"failurePolicy", k.FailurePolicy != ""}, {"leaseSeconds", k.LeaseSeconds != 0}, {"sideChannelPort", k.SideChannelPort != 0}} {
			if f.set {
				bad("engine.kvTransfer."+f.field, "is vLLM's NixlConnector's; SGLang's disaggregation has no such setting")
			}
		}
		switch {
		case k.Role == RoleDecode && k.BootstrapPort != 0:
			bad("engine.kvTransfer.bootstrapPort", "is the prefill engine's: a decode engine is told its prefill engine's port by the router")
		case k.Role == RolePrefill:
			ports("engine.kvTransfer.bootstrapPort", k.BootstrapPort, k.BootstrapPort, "the bootstrap server")
		}
		errs = append(errs, refuseOwned(e.Args, sglangDisaggFlags, "engine.kvTransfer")...)
	default:
		bad("engine.kvTransfer", "is for vLLM (kind %s or %s), SGLang (kind %s) and programs that speak vLLM's protocol (kind %s); kind %s has no KV connector", EngineVLLM, EngineRayVLLM, EngineSGLang, EngineCommand, e.Kind)
	}
	return errs
}

// sglangDisaggFlags are SGLang's flags the plan sets from engine.kvTransfer.
var sglangDisaggFlags = []string{"--disaggregation-mode", "--disaggregation-transfer-backend", "--disaggregation-bootstrap-port", "--disaggregation-ib-device"}

// pairFlags must agree between the prefill and the decode engines of one
// model: the decode engine reads the KV the prefill engine wrote. SGLang
// names them its own way.
var (
	pairFlags       = []string{"--max-model-len", "--block-size", "--dtype", "--kv-cache-dtype", "--quantization", "--revision"}
	sglangPairFlags = []string{"--context-length", "--page-size", "--dtype", "--kv-cache-dtype", "--quantization", "--revision"}
)

// CheckPair refuses a prefill and a decode deployment of one served model
// whose engines could not exchange KV, naming the fields.
func CheckPair(prefill, decode *Deployment) error {
	var errs []string
	if prefill.Model.Source != decode.Model.Source {
		errs = append(errs, fmt.Sprintf("model.source: prefill %q and decode %q differ", prefill.Model.Source, decode.Model.Source))
	}
	if pk, dk := prefill.Engine.Kind, decode.Engine.Kind; (pk == EngineSGLang) != (dk == EngineSGLang) {
		errs = append(errs, fmt.Sprintf("engine.kind: prefill %s and decode %s speak different disaggregation protocols", pk, dk))
	}
	flags := pairFlags
	if prefill.Engine.Kind == EngineSGLang {
		flags = sglangPairFlags
	}
	for _, f := range flags {
		p, _ := ArgValue(prefill.Engine.Args, f)
		d, _ := ArgValue(decode.Engine.Args, f)
		if p != d {
			errs = append(errs, fmt.Sprintf("engine.args %s: prefill %s and decode %s differ (the decode engine reads the prefill engine's KV as it was written)",
				f, orDefault(p), orDefault(d)))
		}
	}
	if pk, dk := prefill.Engine.KVTransfer, decode.Engine.KVTransfer; pk != nil && dk != nil && pk.Connector != dk.Connector {
		errs = append(errs, fmt.Sprintf("engine.kvTransfer.connector: prefill %s and decode %s differ", pk.Connector, dk.Connector))
	}
	if p, d := prefill.Engine.TensorParallelSize, decode.Engine.TensorParallelSize; d < p && prefill.Engine.Kind != EngineSGLang {
		errs = append(errs, fmt.Sprintf("engine.tensorParallelSize: decode %d is smaller than prefill %d (vLLM's NixlConnector needs decode TP ≥ prefill TP)", d, p))
	}
	if len(errs) == 0 {
		return nil
	}
	return fmt.Errorf("%w: deployments %s (prefill) and %s (decode) of model %s cannot be paired: %s", ErrInvalid, prefill.Name, decode.Name,
		prefill.Engine.ServedModelName, strings.Join(errs, "; "))
}

func orDefault(v string) string {
	if v == "" {
		return "(default)"
	}
	return v
}
